"""textserve's toolchain: data, training, export and compression of the shallow text CNN.

Never imported by the server at run time; it writes the model repository the server reads.
"""
