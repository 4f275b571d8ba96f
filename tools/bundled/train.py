#!/usr/bin/env python3
"""Train the bundled moeflux demo model: a tiny Qwen3-Next (hybrid Gated DeltaNet +
gated full attention, sparse MoE with shared expert) that does multi-digit addition.

    nice -n 10 python tools/bundled/train.py            # full run, writes models/bundled/
    python tools/bundled/train.py --bench               # time a few steps only

Task (chat formatted, ChatML):
    <|im_start|>user\n123+4567=<|im_end|>\n<|im_start|>assistant\n4690<|im_end|>
Loss is only on the answer digits and the closing <|im_end|>.

Everything (tokenizer, config, weights) is produced here from scratch; no hub access.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch

torch.set_num_threads(1)

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "models", "bundled")

# ---------------------------------------------------------------- tokenizer
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNK = "<unk>"
# printable ASCII + newline + tab: any English text tokenizes without <unk>
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
VOCAB = SPECIALS + [UNK] + CHARS  # 3 + 1 + 97 = 101 tokens
TOK2ID = {t: i for i, t in enumerate(VOCAB)}
EOT_ID, IM_START_ID, IM_END_ID, UNK_ID = 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def build_tokenizer():
    # Character-level: a BPE model with an empty merge list maps every character to its
    # own token (unknown characters -> <unk>). Special tokens are matched before the model.
    tok = Tokenizer(models.BPE(vocab=dict(TOK2ID), merges=[], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def encode_chars(s):
    return [TOK2ID.get(c, UNK_ID) for c in s]


# ---------------------------------------------------------------- task
MAX_DIGITS = 4


def rand_operand(rng, max_digits=None):
    nd = rng.randint(1, max_digits or MAX_DIGITS)  # uniform over digit count
    lo = 0 if nd == 1 else 10 ** (nd - 1)
    return rng.randint(lo, 10**nd - 1)


def user_text(a, b):
    return f"{a}+{b}="


def prompt_ids(a, b):
    # == chat template rendered with add_generation_prompt=True
    return (
        [IM_START_ID] + encode_chars("user\n" + user_text(a, b)) + [IM_END_ID]
        + encode_chars("\n") + [IM_START_ID] + encode_chars("assistant\n")
    )


def example(a, b):
    p = prompt_ids(a, b)
    ans = encode_chars(str(a + b)) + [IM_END_ID]
    return p + ans, len(p)


def make_batch(rng, bs, max_digits=None):
    seqs = [example(rand_operand(rng, max_digits), rand_operand(rng, max_digits)) for _ in range(bs)]
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((bs, L), EOT_ID, dtype=torch.long)
    labels = torch.full((bs, L), -100, dtype=torch.long)
    for i, (s, p) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, p: len(s)] = torch.tensor(s[p:])  # HF shifts labels internally
    return ids, labels


# ---------------------------------------------------------------- model
def build_config(args):
    return Qwen3NextConfig(
        vocab_size=len(VOCAB),
        hidden_size=args.hidden,
        intermediate_size=args.moe_inter,  # unused (every layer is MoE), kept small
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        partial_rotary_factor=0.25,
        attention_bias=False,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        decoder_sparse_step=1,
        moe_intermediate_size=args.moe_inter,
        shared_expert_intermediate_size=args.moe_inter,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        mlp_only_layers=[],
        full_attention_interval=2,  # linear, full, linear, full
        bos_token_id=EOT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=EOT_ID,
    )


def use_single_chunk_delta_rule(enable):
    """Training speed-up only: the torch fallback of the chunked gated delta rule pads every
    sequence to a multiple of 64. Our sequences are ~35 tokens, so run them as one chunk
    (chunk size = length rounded up to 8). Mathematically identical; eval/generation use the
    stock function."""
    import transformers.models.qwen3_next.modeling_qwen3_next as qm
    if not hasattr(qm, "_stock_chunk_rule"):
        qm._stock_chunk_rule = qm.torch_chunk_gated_delta_rule
    stock = qm._stock_chunk_rule

    def single_chunk(query, *a, **kw):
        kw["chunk_size"] = -(-query.shape[1] // 8) * 8
        return stock(query, *a, **kw)

    qm.torch_chunk_gated_delta_rule = single_chunk if enable else stock


# ---------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, problems, bs=50):
    """Greedy HF generate; batches group equal-length prompts so no padding is needed."""
    model.eval()
    by_len = {}
    for a, b in problems:
        by_len.setdefault(len(prompt_ids(a, b)), []).append((a, b))
    correct, outs = 0, {}
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), bs):
            chunk = group[i: i + bs]
            ids = torch.tensor([prompt_ids(a, b) for a, b in chunk], device=model.device)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                do_sample=False, eos_token_id=[IM_END_ID, EOT_ID], pad_token_id=EOT_ID,
            )
            for (a, b), row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                text = "".join(VOCAB[t] for t in row if t not in (IM_END_ID, EOT_ID))
                outs[(a, b)] = (text, row)
                correct += text == str(a + b)
    model.train()
    return correct / len(problems), outs


# ---------------------------------------------------------------- save
def to_per_expert(sd, cfg):
    """transformers 5.x keeps experts fused (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I]); rewrite to the released Qwen3-Next layout: one tensor per expert."""
    out = {}
    inter = cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            assert v.shape[1] == 2 * inter
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous()
        elif k.endswith("mlp.gate.weight") or "experts" not in k:
            out[k] = v.contiguous()
        else:
            raise ValueError(f"unexpected key {k}")
    return out


def save_all(model, tok, out_dir, dtype):
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = model.config
    # weights: per-expert layout, written directly
    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    sd = to_per_expert(sd, cfg)
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})

    # config.json: HF's own serialisation plus the released-checkpoint spellings
    # (full_attention_interval, rope_theta, partial_rotary_factor at top level).
    cfg.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json")) as f:
        cj = json.load(f)
    cj["architectures"] = ["Qwen3NextForCausalLM"]
    cj["full_attention_interval"] = 2
    cj["rope_theta"] = cfg.rope_parameters["rope_theta"]
    cj["partial_rotary_factor"] = cfg.rope_parameters["partial_rotary_factor"]
    cj["torch_dtype"] = "float32" if dtype == torch.float32 else "bfloat16"
    cj["dtype"] = cj["torch_dtype"]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)
        f.write("\n")

    GenerationConfig(
        bos_token_id=EOT_ID, pad_token_id=EOT_ID, eos_token_id=[IM_END_ID, EOT_ID],
        do_sample=False, max_new_tokens=16,
    ).save_pretrained(tmp)

    # tokenizer.json / tokenizer_config.json / chat_template.jinja
    tok.save(os.path.join(tmp, "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tmp, "tokenizer.json"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=UNK, bos_token=None,
        clean_up_tokenization_spaces=False, model_max_length=512,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = CHAT_TEMPLATE  # inline as well as in chat_template.jinja
    tc["add_bos_token"] = False
    tc["add_eos_token"] = False
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # also loadable by transformers 4.x
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
        f.write("\n")
    with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    tok.save(os.path.join(tmp, "tokenizer.json"))  # keep the pristine char-level tokenizer

    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), 0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--time-budget", type=float, default=22 * 60,
                    help="seconds; if the machine is too slow for --steps, the cosine is compressed to end by then")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--bench", action="store_true", help="time 10 steps and exit")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--max-digits", type=int, default=4)
    ap.add_argument("--curriculum", type=float, default=0.0,
                    help="fraction of training during which the operand length grows from 2 to max")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="only run the checks on an existing --out")
    args = ap.parse_args()

    global MAX_DIGITS
    MAX_DIGITS = args.max_digits
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    # the fast path used in training must equal the real tokenizer + chat template
    for a, b in [(12, 34), (9999, 1), (0, 7)]:
        assert tok.encode(f"<|im_start|>user\n{a}+{b}=<|im_end|>\n<|im_start|>assistant\n").ids == prompt_ids(a, b)

    held_out = held_out_problems(args.seed)
    if args.eval_only:
        return check_saved(args.out, torch.float32 if args.dtype == "float32" else torch.bfloat16, held_out)

    cfg = build_config(args)
    assert cfg.layer_types == ["linear_attention", "full_attention"] * 2, cfg.layer_types
    model = Qwen3NextForCausalLM(cfg).to(args.device)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params: {nparams:,} ({nparams * 4 / 1e6:.1f} MB f32)", flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or "A_log" in n or "dt_bias" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def lr_at(step, total, elapsed=0.0):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, total - args.warmup)
        t = max(t, elapsed / args.time_budget)  # compress the cosine if the machine is slow
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


    model.train()
    use_single_chunk_delta_rule(True)
    total = 10 if args.bench else args.steps
    t0 = time.time()
    ema = None
    for step in range(total):
        lr = lr_at(step, total, time.time() - t0)
        for g in opt.param_groups:
            g["lr"] = lr
        md = None
        if args.curriculum > 0:
            frac = min(1.0, step / (args.curriculum * total))
            md = min(MAX_DIGITS, 2 + int(frac * (MAX_DIGITS - 1)))
        ids, labels = make_batch(rng, args.batch, md)
        ids, labels = ids.to(args.device), labels.to(args.device)
        out = model(input_ids=ids, labels=labels, output_router_logits=True, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
        el = time.time() - t0
        if args.bench:
            print(f"step {step} loss {out.loss.item():.4f} {el / (step + 1):.3f}s/step", flush=True)
            continue
        if step % 100 == 0 or step == total - 1:
            print(f"step {step:5d} loss {ema:.4f} aux {out.aux_loss.item():.3f} lr {lr:.2e} "
                  f"{el:6.0f}s ({el / (step + 1):.3f}s/step)", flush=True)
        if step > 0 and step % args.eval_every == 0:
            use_single_chunk_delta_rule(False)
            acc, _ = evaluate(model, held_out)
            use_single_chunk_delta_rule(True)
            print(f"  held-out exact match (200): {acc:.1%}", flush=True)
        if el > args.time_budget:
            print(f"time budget reached at step {step} (lr schedule was compressed)", flush=True)
            break
    if args.bench:
        return
    use_single_chunk_delta_rule(False)
    train_s = time.time() - t0
    print(f"training time: {train_s:.0f}s", flush=True)

    if args.no_save:
        acc, _ = evaluate(model, held_out)
        print(f"final held-out exact match (200): {acc:.1%}", flush=True)
        return
    model = model.cpu()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = model.to(dtype)
    save_all(model, tok, args.out, dtype)

    # reload from disk (per-expert checkpoint -> HF fuses on load) and check identical logits
    model.eval()
    check_saved(args.out, dtype, held_out, model)


def held_out_problems(seed):
    # separate RNG from training; training examples are random so overlap is incidental
    eval_rng = random.Random(seed + 1)
    return [(rand_operand(eval_rng), rand_operand(eval_rng)) for _ in range(200)]


def check_saved(out_dir, dtype, held_out, model=None):
    reloaded = Qwen3NextForCausalLM.from_pretrained(out_dir, dtype=dtype)
    reloaded.eval()
    if model is not None:
        ids, _ = make_batch(random.Random(7), 8)
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max().item()
        print(f"reload max |logit diff|: {diff}", flush=True)
        assert diff == 0.0, diff
    keys = load_file(os.path.join(out_dir, "model.safetensors")).keys()
    assert not any("gate_up_proj" in k for k in keys)
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys

    acc, outs = evaluate(reloaded, held_out)
    print(f"held-out exact match (greedy HF generate, 200 problems): {acc:.1%}", flush=True)

    # examples through the saved tokenizer + chat template
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    for a, b in [(12, 34), (123, 4567), (999, 1), (5, 7), (8888, 2222)]:
        msgs = [{"role": "user", "content": user_text(a, b)}]
        p = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = hf_tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        assert ids[0].tolist() == prompt_ids(a, b)
        with torch.no_grad():
            gen = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False)
        new = gen[0, ids.shape[1]:].tolist()
        print(f"{user_text(a, b)} -> {hf_tok.decode(new, skip_special_tokens=True)!r} "
              f"(expected {a + b}) prompt_ids={ids[0].tolist()} gen_ids={new}", flush=True)
    wrong = [(a, b, t) for (a, b), (t, _) in outs.items() if t != str(a + b)]
    print("wrong:", wrong[:20])
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"models/bundled size: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
