"""specformer-deploy: MSVP-trained ViTs, exported, audited, certified and served."""
__version__ = "0.1.0"
