"""Checkpoint conversion between Hugging Face and the framework, for every registered generation.

    python launch/convert.py import-hf --hf-dir SRC --out DST [--tp N --pp N --ep N]   # then: launch/train.py ... model.init_from=DST
    python launch/convert.py export-hf --ckpt SRC --out DST [--dtype bf16|fp16|fp32]
    python launch/convert.py export-hf --ckpt LORA_RUN --out DST --lora-adapter   # PEFT adapter, not merged

See `qvl_train/tools/convert.py` for what is written and how configs are found.
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from qvl_train import generations

    listed = ", ".join(f"{n} (config.json model_type {generations.get(n).hf_model_type!r})" for n in generations.NAMES)
    p = argparse.ArgumentParser(
        prog="convert.py", description=__doc__ + f"\nGenerations (qvl_train.generations.NAMES): {listed}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF checkpoint dir → framework checkpoint (dist_checkpointing)")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="checkpoint root to write (use it as model.init_from)")
    imp.add_argument("--tp", type=int, default=1, help="convert through a model built at this tensor-parallel size")
    imp.add_argument("--pp", type=int, default=1, help="… and this many pipeline stages (starts tp·pp processes)")
    imp.add_argument("--ep", type=int, default=1, help="… and this expert-parallel size (MoE; pp·max(tp, ep) processes)")
    exp = sub.add_parser("export-hf", help="framework checkpoint → HF directory")
    exp.add_argument("--ckpt", required=True, help="checkpoint root, step directory or training output_dir")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="tensor dtype (default: the imported source's dtypes, else bf16; adapters fp32)")
    exp.add_argument("--lora-adapter", action="store_true",
                     help="LoRA run: write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
                          "instead of the merged model")
    args = p.parse_args(argv)

    from qvl_train.tools import convert

    try:
        if args.cmd == "import-hf":
            step = convert.import_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep)
            print(f"imported {args.hf_dir} -> {step}")
        else:
            out = convert.export_hf(args.ckpt, args.out, dtype=args.dtype, lora_adapter=args.lora_adapter)
            print(f"exported {args.ckpt} -> {out}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # required: dist_checkpointing saves through worker processes
    sys.exit(main())
