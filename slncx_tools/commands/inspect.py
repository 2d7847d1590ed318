import click


@click.command(short_help="List a checkpoint's tensors (path, shape, dtype, int8 blocks, bytes) from headers.")
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--check", is_flag=True, help="Report every problem found instead of stopping at the first.")
def command(path, as_json, check):
    """List the tensors of a checkpoint (ckpt-0 or store; default: the embedded slncx-tiny) from
    its headers alone.

    Prints index, parameter path, logical shape, stored dtype, quantization and bytes for each
    tensor, the totals, and which config preset the shapes match. Reads only file headers, so it
    takes seconds even on the 318 GB release.
    """
    import json

    from ..checkpoint import open_checkpoint
    from ..errors import StructureError
    from ..summary import human_bytes, summarize

    if path is None:
        from ..embedded import embedded_dir

        path = embedded_dir()
    ckpt = open_checkpoint(path)
    info = summarize(ckpt, check=check)
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        width = max(len(r["path"]) for r in info["tensors"])
        click.echo(f"{'index':>5}  {'path':<{width}}  {'shape':<18} {'dtype':<8} {'quantization':<28} {'bytes':>12}")
        for r in info["tensors"]:
            shape = "x".join(map(str, r["shape"]))
            click.echo(f"{r['index']:>5}  {r['path']:<{width}}  {shape:<18} {r['dtype']:<8} {r['quant']:<28} {r['bytes']:>12,}")
        cfg = info["config"]
        which = info["preset"] or f"custom (inferred: D={cfg['emb_size']}, layers={cfg['num_layers']}, vocab={cfg['vocab_size']})"
        click.echo(
            f"{info['total_tensors']} tensors, {info['total_params']:,} parameters, "
            f"{info['total_bytes']:,} bytes ({human_bytes(info['total_bytes'])}); config: {which}"
        )
    if info["problems"]:
        for p in info["problems"]:
            click.echo(f"problem: {p}", err=True)
        raise StructureError(f"{len(info['problems'])} problem(s) found in {info['path']}")
