"""`navit doctor`: what this installation can do (versions, SIMD Pillow, image formats, CPUs, CUDA)."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import typer


def doctor_report() -> dict[str, Any]:
    """Versions and capabilities as a dict (also used by `navit pack` to record its environment)."""
    import numpy
    import PIL
    import PIL.features
    import pyarrow
    import pydantic

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "pydantic": pydantic.__version__,
        "pil": PIL.__version__,
        "pil_simd": ".post" in PIL.__version__,
        "cpu_count": os.cpu_count(),
    }
    # Decodable formats: the ones NaViT sources use, with the codec library behind each.
    report["formats"] = {
        "jpeg": bool(PIL.features.check("jpg")),
        "png": bool(PIL.features.check("zlib")),
        "webp": bool(PIL.features.check("webp")),
        "tiff": bool(PIL.features.check("libtiff")),
        "gif": True,
        "bmp": True,
        "lcms2": bool(PIL.features.check("littlecms2")),
    }
    try:
        import torch

        report["torch"] = torch.__version__
        report["cuda"] = torch.cuda.is_available()
        report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        report["torch"] = None
        report["cuda"] = False
    try:
        import ray

        report["ray"] = ray.__version__
    except ImportError:
        report["ray"] = None
    return report


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
        """Print versions of torch, ray, pyarrow and PIL (SIMD build?), decodable formats, CPUs, CUDA."""
        r = doctor_report()
        if json_out:
            typer.echo(json.dumps(r, indent=2))
            return
        simd = "pillow-simd" if r["pil_simd"] else "plain Pillow (NOT the SIMD build: run 'make setup')"
        typer.echo(f"python    {r['python']}")
        typer.echo(
            f"torch     {r['torch']}   CUDA: {'yes ' + str(r.get('cuda_devices')) if r['cuda'] else 'no'}"
        )
        typer.echo(f"ray       {r['ray']}")
        typer.echo(f"pyarrow   {r['pyarrow']}")
        typer.echo(f"numpy     {r['numpy']}   pydantic {r['pydantic']}")
        typer.echo(f"PIL       {r['pil']}   ({simd})")
        fm = r["formats"]
        ok = ", ".join(k for k, v in fm.items() if v and k != "lcms2")
        missing = ", ".join(k for k, v in fm.items() if not v)
        typer.echo(f"formats   {ok}" + (f"   missing: {missing}" if missing else ""))
        typer.echo(f"cpus      {r['cpu_count']}")
