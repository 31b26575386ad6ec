"""mtpquant: 4-bit MoE artifacts that keep their MTP draft head."""

__version__ = "0.1.0"
