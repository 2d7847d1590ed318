import click


@click.command(short_help='Check structure, checksums and values; --against: KLD, top-1, perplexity.')
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--sha256sums", type=click.Path(exists=True, dir_okay=False),
              help="Checksums in sha256sum format for a release ckpt-0 (default: its SHA256SUMS, written by download).")
@click.option("--against", "reference", type=click.Path(exists=True, file_okay=False),
              help="Reference checkpoint: run both through the model and report KL divergence, top-1, perplexity.")
@click.option("--weights-only", is_flag=True, help="With --against: compare weights tensor by tensor (RMSE, SNR, cosine), no model run.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text to evaluate on (tokenized with the checkpoint's tokenizer).")
@click.option("--random-tokens", type=int, default=None, help="Evaluate on N random token ids instead of text.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-tokens.")
@click.option("--context", type=int, default=None, help="Tokens per evaluated sequence (default: min(512, model context)).")
@click.option("--batch", type=int, default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--mesh", default="1x1", show_default=True, help="Device mesh MxD (model x data) for the model runs.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False), help="SentencePiece model for --prompts.")
@click.option("--max-kld", type=float, default=0.01, show_default=True, help="Fail if the mean KL divergence exceeds this.")
@click.option("--min-top1", type=float, default=0.95, show_default=True, help="Fail if top-1 agreement is below this fraction.")
@click.option("--workers", type=int, default=4, show_default=True, help="Files/arrays hashed in parallel.")
@click.option("--skip-checksums", is_flag=True, help="Skip hashing and value checks (only with --against).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(path, sha256sums, reference, weights_only, prompts_file, random_tokens, seed, context, batch, mesh,
            tokenizer_path, max_kld, min_top1, workers, skip_checksums, as_json, quiet):
    """Check a checkpoint (ckpt-0 or store; default: the embedded slncx-tiny): structure,
    checksums, values; and with --against,
    what quantization or resharding cost, measured through the model.

    \b
    Structure: every tensor of the parameter table present with the right shape and dtype, no
    extra files. Checksums: each store array against its manifest; each release file against
    SHA256SUMS. Values: floats finite, scales finite and positive. Exit 0 only when all hold.

    \b
    With --against REFERENCE, both checkpoints run on the same tokens and the report gives, like
    llama.cpp's KL-divergence tool: KLD(reference || candidate) mean/median/p99.9/max, top-1
    agreement, RMS delta-p of the reference's top token, perplexity of each and their ratio, and
    |delta logit|. --max-kld and --min-top1 set the pass/fail bounds.

    \b
    Example:  slncx-tools verify store/ --against checkpoints/ckpt-0 --random-tokens 2048
    """
    import json

    from ..errors import SlncxError
    from ..progress import ClickBar

    if path is None:
        from ..embedded import embedded_dir

        path = str(embedded_dir())
    if weights_only and not reference:
        raise click.UsageError("--weights-only needs --against REFERENCE")
    if skip_checksums and not reference:
        raise click.UsageError("--skip-checksums only makes sense with --against")
    result = {}
    failures = []
    if not skip_checksums:
        from ..verify import check_checkpoint

        with ClickBar("verify", enabled=not (quiet or as_json)) as bar:
            check = check_checkpoint(path, sha256sums=sha256sums, workers=workers, progress=bar)
        result["check"] = check.to_dict()
        failures += check.problems
    if reference:
        result["against"] = str(reference)
        result.update(_compare(path, reference, weights_only, prompts_file, random_tokens, seed, context, batch,
                               mesh, tokenizer_path, quiet or as_json))
        if "parity" in result:
            p = result["parity"]
            if p["kld"]["mean"] > max_kld:
                failures.append(f"mean KL divergence {p['kld']['mean']:.6f} exceeds --max-kld {max_kld}")
            if p["top1_agreement"] < min_top1:
                failures.append(f"top-1 agreement {p['top1_agreement']:.4f} is below --min-top1 {min_top1}")
    result["ok"] = not failures
    result["failures"] = failures
    if as_json:
        click.echo(json.dumps(result, indent=1, default=float))
    else:
        _print(result, max_kld, min_top1)
    if failures:
        raise SlncxError(f"verification failed: {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))


def _compare(path, reference, weights_only, prompts_file, random_tokens, seed, context, batch, mesh_spec,
             tokenizer_path, quiet):
    from ..checkpoint import open_checkpoint
    from ..parity import logit_parity, random_tokens as make_random, weight_errors, windows
    from ..progress import ClickBar

    cand, ref = open_checkpoint(path), open_checkpoint(reference)
    if weights_only:
        with ClickBar("weights", enabled=not quiet, unit_bytes=False) as bar:
            return {"weights": weight_errors(ref, cand, progress=bar)}
    cfg = ref.config
    context = context or min(512, cfg.sequence_len)
    if prompts_file:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(checkpoint=reference, explicit=tokenizer_path, vocab_size=cfg.vocab_size)
        with open(prompts_file, encoding="utf-8") as f:
            ids = tok.encode(f.read())
        tokens = windows(ids, context)
        source = {"prompts": str(prompts_file), "tokens": len(ids)}
    else:
        n = random_tokens or 4 * context
        tokens = make_random(n, cfg.vocab_size, seed, context)
        source = {"random_tokens": n, "seed": seed}
    mesh = None
    if mesh_spec and mesh_spec not in ("1x1", "1"):
        from ..mesh import make_mesh

        mesh = make_mesh(mesh_spec)
    with ClickBar("model", enabled=not quiet, unit_bytes=False) as bar:
        report = logit_parity(ref, cand, tokens, mesh=mesh, batch=batch, progress=bar)
    report["tokens"] = source
    report["context"] = context
    return {"parity": report}


def _print(result, max_kld, min_top1):
    check = result.get("check")
    if check:
        click.echo(f"checkpoint   {check['path']} ({check['kind']}, {check['tensors']} tensors)")
        click.echo(f"checksums    {check['arrays_hashed']} {'arrays' if check['kind'] == 'store' else 'files'}, "
                   f"{check['bytes_hashed']:,} bytes hashed against {check['checksums']}")
        for note in check["notes"]:
            click.echo(f"note         {note}")
        for problem in check["problems"]:
            click.echo(f"problem      {problem}")
    if "weights" in result:
        w = result["weights"]
        click.echo(f"weights vs   {result['against']}: {'bit-exact' if w['exact'] else 'differ'}")
        click.echo(f"  {'group':<32} {'RMSE':>10} {'SNR dB':>8} {'cosine':>10} {'max abs':>10}")
        for name, g in w["groups"].items():
            click.echo(f"  {name:<32} {g['rmse']:>10.3g} {g['snr_db']:>8.1f} {g['cosine']:>10.6f} {g['max_abs']:>10.3g}")
    if "parity" in result:
        p = result["parity"]
        k = p["kld"]
        click.echo(f"parity vs    {result['against']}: {p['positions']} positions")
        click.echo(f"  KLD         mean {k['mean']:.6f}  median {k['median']:.6f}  p99.9 {k['p99.9']:.6f}  max {k['max']:.6f}")
        click.echo(f"  top-1       {100 * p['top1_agreement']:.2f} % agreement")
        click.echo(f"  delta-p     RMS {100 * p['delta_p_top']['rms']:.3f} % (reference's top token)")
        if "perplexity" in p:
            pp = p["perplexity"]
            click.echo(f"  perplexity  reference {pp['reference']:.4f}  candidate {pp['candidate']:.4f}  ratio {pp['ratio']:.5f}")
        click.echo(f"  |dlogit|    mean {p['abs_delta_logit']['mean']:.5f}  max {p['abs_delta_logit']['max']:.5f}")
        click.echo(f"  bounds      mean KLD <= {max_kld}, top-1 >= {min_top1}")
    click.echo("result       " + ("OK" if result["ok"] else f"FAILED ({len(result['failures'])} problem(s))"))
