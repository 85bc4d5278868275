"""Models in and out: loading (built-in names, folders, GGUF, hub ids), welore checkpoints, and
streaming a model's decoder blocks from disk one at a time.

    models.py      load_model and its options (dtype, device, --max-memory)
    checkpoint.py  save / load / load_checkpoint / export_dense, the checkpoint format and its record
    stream.py      block-by-block access to a model whose blocks stay on disk, sharded writing
"""
