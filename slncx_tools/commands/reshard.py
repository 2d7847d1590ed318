import click


@click.command(short_help="Lay a store out for a device mesh: each device's shard is one chunk.")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--mesh", "mesh_spec", required=True, help="MxD = model axis M x data axis D (8x1 is the release's layout), or model=M,data=D.")
@click.option("--hosts", type=int, default=1, show_default=True, help="Processes the devices are split over (evenly); the manifest lists each one's chunks.")
@click.option("--compression", default="none", show_default=True, help="none | zstd[:LEVEL].")
@click.option("--memory-budget", default="2G", show_default=True, help="Working-memory budget, e.g. 2G, 512M.")
@click.option("--dry-run", is_flag=True, help="Print per-device memory and per-host read bytes; write nothing.")
@click.option("--batch", type=int, default=1, show_default=True, help="Dry run: batch size for the KV cache estimate.")
@click.option("--context", type=int, default=None, help="Dry run: context length for the KV cache estimate [default: the config's sequence_len].")
@click.option("--cache-dtype", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True, help="Dry run: KV cache dtype (sample's default is f32).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(source, out, mesh_spec, hosts, compression, memory_budget, dry_run, batch, context, cache_dtype, as_json, no_progress):
    """Lay SOURCE (a store or a release ckpt-0) out for a device mesh as a store OUT.

    Every array's chunk is one device's shard, so loading reads each device's bytes in one piece.
    The mesh is checked against every tensor before anything is written. Interrupt at any time and
    rerun the same command to resume.
    """
    import json

    from ..convert import parse_bytes
    from ..summary import human_bytes

    if dry_run:
        from ..checkpoint import open_checkpoint
        from ..reshard import describe, plan_reshard

        src = open_checkpoint(source)
        info = describe(plan_reshard(src, mesh_spec, hosts), out, batch=batch, context=context,
                        cache_itemsize=4 if cache_dtype == "f32" else 2)
        if as_json:
            click.echo(json.dumps(info, indent=1))
            return
        m = info["mesh"]
        click.echo(f"{info['tensors']} tensors from {info['source']} -> {out}: mesh model={m['model']} x data={m['data']} "
                   f"({m['devices']} devices, {m['hosts']} host(s))")
        click.echo(f"{'group':<32} {'tensors':>7} {'per device':>11}  shard shape")
        for g in info["groups"]:
            shards = ", ".join(f"{p} {s}" for p, s in g["shard"].items())
            click.echo(f"{g['group']:<32} {g['tensors']:>7} {human_bytes(g['device_bytes']):>11}  {shards}")
        kv = info["kv_cache"]
        click.echo(f"per device: weights {human_bytes(info['device_weight_bytes'])} + KV cache "
                   f"{human_bytes(kv['device_bytes'])} (batch {kv['batch']}, context {kv['context']}) = "
                   f"{human_bytes(info['device_total_bytes'])}")
        for h in info["hosts"]:
            click.echo(f"host {h['host']}: {h['devices']} devices, reads {h['chunks']} chunks, {human_bytes(h['read_bytes'])}")
        if info["regridded"]:
            click.echo(f"scales re-gridded (lossless) for {len(info['regridded'])} tensors")
        ok = "enough" if info["enough_space"] else "NOT enough"
        click.echo(f"output {human_bytes(info['out_bytes'])}; free space at {out}: {human_bytes(info['free_bytes'])} ({ok})")
        return

    from ..progress import ClickBar
    from ..reshard import reshard_checkpoint

    with ClickBar("reshard", enabled=not (as_json or no_progress)) as bar:
        report = reshard_checkpoint(source, out, mesh_spec, hosts=hosts, compression=compression,
                                    memory_budget=parse_bytes(memory_budget), progress=bar)
    if as_json:
        click.echo(json.dumps(report, indent=1, default=str))
        return
    m = report["mesh"]
    resumed = f", {report['resumed']} resumed" if report["resumed"] else ""
    click.echo(f"{report['tensors']} tensors{resumed} -> {out}: mesh model={m['model']} x data={m['data']}, "
               f"{human_bytes(report['device_weight_bytes'])} of weights per device")
    for h in report["hosts"]:
        click.echo(f"host {h['host']}: {h['devices']} devices, reads {h['chunks']} chunks, {human_bytes(h['read_bytes'])}")
    if report["regridded"]:
        click.echo(f"scales re-gridded (lossless) for {len(report['regridded'])} tensors")
