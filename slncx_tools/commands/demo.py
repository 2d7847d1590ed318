import click


@click.command(short_help='Run download → quantize → reshard → verify → sample on the embedded model, offline.')
@click.option("--keep", type=click.Path(file_okay=False), help="Leave the artefacts in this (new or empty) directory.")
@click.option("--mesh", "mesh_spec", default="8x1", show_default=True, help="Mesh to reshard for and run on (CPU devices).")
@click.option("--prompt", default="def __init__(self, ", show_default=True, help="Prompt for the sampling step.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the per-step report as JSON.")
def command(keep, mesh_spec, prompt, max_new_tokens, as_json):
    """Run the whole pipeline on the embedded slncx-tiny, offline, in under a minute.

    \b
    download (from a hub on 127.0.0.1 serving the embedded checkpoint, through the real download
    path, SHA-256 checked) -> quantize into a zarr3 store -> reshard --mesh 8x1 on 8 CPU devices ->
    verify checksums and int8-vs-float parity (KLD, top-1, perplexity) -> sample a continuation.
    """
    import json
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    if "jax" not in sys.modules:  # 8 CPU devices for the mesh; must be set before jax starts
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

    from ..demo import run_demo
    from ..errors import SlncxError

    if keep:
        work = Path(keep)
        if work.exists() and any(work.iterdir()):
            raise click.BadParameter(f"{work} is not empty", param_hint="--keep")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="slncx-demo-"))
    try:
        result = run_demo(work, mesh_spec=mesh_spec, prompt=prompt, max_new_tokens=max_new_tokens,
                          say=(lambda s: None) if as_json else click.echo)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1, default=float))
    elif keep:
        click.echo(f"artefacts kept in {work}")
    if not result.ok:
        raise SlncxError(f"demo failed: {'; '.join(result.failures)}")
