"""Vision encoders, one file per family (Qwen2-VL: `qwen2_vl.py`)."""
