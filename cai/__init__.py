"""cai: Constitutional AI critique→revise data generation, fine-tuning and serving."""

__version__ = "0.1.0"
