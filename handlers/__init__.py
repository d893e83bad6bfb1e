"""The TorchServe handler, installed with the wheel as ``specformer_handlers`` so that
`specformer-deploy package` finds it after a plain ``pip install``."""
