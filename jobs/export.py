"""Export a run's pre-trained encoder for other tools.

    python -m jobs.export --run-dir runs/<run> --format timm [--out DIR]

``timm``: ``DIR`` (default ``<run>/timm``, which pre-training already writes) holds
``model.safetensors`` and ``config.json`` (hpc_mim/export.py). Load it with

    timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)

or, for a shape timm registers (ViT-B/16 at 224 px: ``vit_base_patch16_224``),
``timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"),
num_classes=0)``. Exit 2 with the reason when the run directory cannot be exported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_mim.config_error import ConfigError  # noqa: E402

FORMATS = ("timm",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="a run directory with encoder.pt")
    ap.add_argument("--format", default="timm", choices=FORMATS)
    ap.add_argument("--out", type=Path, help="the folder to write (default <run>/timm)")
    args = ap.parse_args(argv)
    for name in ("config.yaml", "encoder.pt"):
        if not (args.run_dir / name).is_file():
            print(f"error: --run-dir {args.run_dir}: no {name} (a run directory whose pre-training "
                  "finished has both)", file=sys.stderr)
            return 2
    from hpc_mim.export import WEIGHTS, export_timm, read_export
    try:
        out = export_timm(args.run_dir, args.out)
    except ConfigError as e:
        print(f"error: {args.run_dir / 'config.yaml'}: {e}", file=sys.stderr)
        return 2
    cfg = read_export(out)
    print(f"wrote {out / WEIGHTS} and {out / 'config.json'} ({cfg['architecture']}, "
          f"{cfg['hpc_mim']['method']}, {cfg['num_features']} features)\n"
          f"load:  timm.create_model(\"local-dir:{out}\", pretrained=True, num_classes=0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
