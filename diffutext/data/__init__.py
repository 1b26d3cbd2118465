"""Data: tasks (where pairs come from), tokenizers, and packing pairs into sequences."""
