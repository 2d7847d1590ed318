import click


@click.command(short_help='Generate text with the pure-JAX model (KV cache, top-2 MoE, int8, any mesh).')
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--prompt-file", type=click.File("r"), help="Read the prompt from a file ('-' = stdin).")
@click.option("--tokens", "token_lists", multiple=True, help="Prompt as token ids, e.g. 1,2,3 (no tokenizer needed); repeat for a batch.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1), help="Nucleus: smallest top set reaching this probability.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Keep only the k most likely tokens (0 = off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--mesh", "mesh_spec", default="1x1", show_default=True, help="MxD: model x data devices (8x1 = 8-way model parallel), or model=M,data=D.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False), help="SentencePiece model (default: tokenizer.model beside the checkpoint, else $TOKENIZER_URL).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after eos.")
@click.option("--json", "as_json", is_flag=True, help="Print ids, text, per-token probabilities and timing as JSON.")
def command(checkpoint, prompts, prompt_file, token_lists, max_new_tokens, temperature, top_p, top_k, seed, mesh_spec, tokenizer_path, ignore_eos, as_json):
    """Generate text from CHECKPOINT (a release ckpt-0 directory or a store; default: the embedded
    slncx-tiny model), streaming it.

    \b
    Example:  slncx-tools sample --prompt "def " --max-new-tokens 40
    """
    import json
    import sys

    from ..checkpoint import open_checkpoint
    from ..errors import SlncxError

    prompts = list(prompts)
    if prompt_file is not None:
        prompts.append(prompt_file.read())
    if not prompts and not token_lists:
        raise click.UsageError("give --prompt TEXT, --prompt-file FILE or --tokens 1,2,3")
    if prompts and token_lists:
        raise click.UsageError("use either text prompts or --tokens, not both")

    if checkpoint is None:
        from ..embedded import embedded_dir

        checkpoint = embedded_dir()
    ckpt = open_checkpoint(checkpoint)
    cfg = ckpt.config
    tok = None
    if token_lists:
        try:
            batch = [[int(t) for t in s.replace(" ", "").split(",") if t] for s in token_lists]
        except ValueError:
            raise click.BadParameter("expected comma-separated integers, e.g. 1,2,3", param_hint="--tokens") from None
    else:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(checkpoint, tokenizer_path, vocab_size=cfg.vocab_size)
        batch = [tok.encode(p) for p in prompts]

    from ..sampling import check_prompts

    check_prompts(batch, cfg)

    import jax

    from ..load import load_params
    from ..mesh import check_mesh, make_mesh
    from ..sampling import Generator

    mesh = make_mesh(mesh_spec)
    check_mesh(cfg, mesh)
    single = len(mesh.devices.flat) == 1
    params = load_params(ckpt, None if single else mesh)
    gen = Generator(params, cfg, None if single else mesh)

    stream = not as_json and len(batch) == 1
    shown = [""]
    ids_so_far = []

    def on_tokens(new):
        if not stream:
            return
        ids_so_far.extend(new[0])
        text = tok.decode(ids_so_far) if tok else "".join(f" {i}" for i in ids_so_far)
        click.echo(text[len(shown[0]):], nl=False)
        sys.stdout.flush()
        shown[0] = text

    try:
        out = gen.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           seed=seed, ignore_eos=ignore_eos, on_tokens=on_tokens)
    except (ValueError, TypeError) as e:  # a shape/config problem inside the model
        raise SlncxError(f"checkpoint {checkpoint} does not run with config {cfg.name}: {e}") from None
    texts = [tok.decode(i) for i in out.ids] if tok else [None] * len(batch)
    if as_json:
        click.echo(json.dumps({
            "config": cfg.name,
            "mesh": mesh_spec,
            "devices": [str(d) for d in mesh.devices.flat],
            "results": [
                {"prompt_ids": p, "ids": i, "text": t, "probs": pr, "stopped_at_eos": s}
                for p, i, t, pr, s in zip(batch, out.ids, texts, out.probs, out.stopped or [False] * len(batch))
            ],
            "timing": {
                "prefill_ms": round(out.prefill_s * 1e3, 3),
                "prefill_tokens_per_s": round(sum(out.prompt_lengths) / out.prefill_s, 1) if out.prefill_s else None,
                "decode_tokens_per_s": round(out.decode_tokens_per_s, 1),
                "decode_steps": out.decode_steps,
                "compile_s": round(out.compile_s, 3),
            },
            "backend": jax.default_backend(),
        }))
    elif stream:
        click.echo("")
    else:
        for n, (i, t) in enumerate(zip(out.ids, texts)):
            click.echo(f"[{n}] " + (t if t is not None else ",".join(map(str, i))))
