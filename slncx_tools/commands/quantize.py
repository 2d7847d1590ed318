import click


@click.command(short_help='Stream a checkpoint into an int8 zarr3 store (or release files); resumable.')
@click.argument("paths", nargs=-1, metavar="[SOURCE] OUT", type=click.Path(file_okay=False))
@click.option("--requantize", is_flag=True, help="Collapse existing R-block scales into per-channel (R=1) scales.")
@click.option("--scale-dtype", type=click.Choice(["bf16", "f32"]), default="bf16", show_default=True, help="dtype of newly computed scales.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only (re)quantize parameters whose path matches (repeatable); others are carried.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Carry parameters whose path matches unchanged (repeatable).")
@click.option("--method", type=click.Choice(["absmax", "mse"]), default="absmax", show_default=True, help="mse: per-channel clipping ratio that minimises squared error.")
@click.option("--embeddings", type=click.Choice(["float", "int8"]), default="float", show_default=True, help="int8: per-row int8 embeddings (also the tied output projection).")
@click.option("--format", "fmt", type=click.Choice(["store", "release"]), default="store", show_default=True, help="release: write a ckpt-0 the original loader accepts.")
@click.option("--compression", default="zstd:1", show_default=True, help="none | zstd[:LEVEL] (store format).")
@click.option("--workers", type=int, default=1, show_default=True, help="Tensors converted in parallel (the memory budget is shared).")
@click.option("--memory-budget", default="2G", show_default=True, help="Working-memory budget, e.g. 2G, 512M.")
@click.option("--dry-run", is_flag=True, help="Print the plan, bytes, estimated time and the free-space check; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(paths, requantize, scale_dtype, include, exclude, method, embeddings, fmt, compression, workers,
            memory_budget, dry_run, as_json, no_progress):
    """Convert SOURCE (a release ckpt-0 or its parent, or a complete store; default: the embedded
    slncx-tiny) into a store OUT.

    int8 tensors are carried bit-exactly; float matrices become per-output-channel int8 (SPEC §3);
    norms and router stay float32. Interrupt at any time and rerun the same command to resume.
    """
    import json
    import math

    from ._common import source_and_out

    source, out = source_and_out(paths)

    from ..checkpoint import open_checkpoint
    from ..convert import QuantizeOptions, describe_plan, parse_bytes, plan, quantize_checkpoint
    from ..progress import ClickBar
    from ..summary import human_bytes

    opts = QuantizeOptions(
        requantize=requantize, scale_dtype="bfloat16" if scale_dtype == "bf16" else "float32",
        include=tuple(include), exclude=tuple(exclude), method=method, embeddings=embeddings, format=fmt,
        compression=compression, workers=workers, memory_budget=parse_bytes(memory_budget),
    )
    if dry_run:
        src = open_checkpoint(source)
        info = describe_plan(plan(src, opts), src, out, opts)
        if as_json:
            click.echo(json.dumps(info, indent=1))
            return
        click.echo(f"{info['tensors']} tensors from {info['source']} -> {out} ({fmt})")
        for action, a in sorted(info["actions"].items()):
            click.echo(f"  {action:<14} {a['tensors']:>5} tensors  in {human_bytes(a['in_bytes']):>11}  out ≤ {human_bytes(a['out_bytes']):>11}")
        click.echo(f"input {human_bytes(info['in_bytes'])}, output ≤ {human_bytes(info['out_bytes_max'])}")
        if info["read_rate_bytes_per_s"]:
            click.echo(f"disk probe: {human_bytes(info['read_rate_bytes_per_s'])}/s read -> about {info['estimated_seconds']:.0f} s")
        ok = "enough" if info["enough_space"] else "NOT enough"
        click.echo(f"free space at {out}: {human_bytes(info['free_bytes'])} ({ok})")
        return
    with ClickBar("quantize", enabled=not (as_json or no_progress)) as bar:
        report = quantize_checkpoint(source, out, opts, progress=bar)
    if as_json:
        click.echo(json.dumps(report, indent=1, default=str))
        return
    click.echo(f"{'group':<32} {'tensors':>7} {'action':<14} {'RMSE':>10} {'SNR dB':>8} {'max abs':>10} {'in':>11} {'out':>11}")
    for g in report["groups"]:
        snr = "exact" if math.isinf(g["snr_db"]) else f"{g['snr_db']:.2f}"
        click.echo(
            f"{g['group']:<32} {g['tensors']:>7} {g['action']:<14} {g['rmse']:>10.3g} {snr:>8} {g['max_abs']:>10.3g} "
            f"{human_bytes(g['in_bytes']):>11} {human_bytes(g['out_bytes']):>11}"
        )
    resumed = f", {report['resumed']} resumed" if report["resumed"] else ""
    click.echo(
        f"{report['tensors']} tensors{resumed}: read {human_bytes(report['in_bytes'])}, wrote "
        f"{human_bytes(report['out_bytes_on_disk'])} on disk -> {out}"
    )
