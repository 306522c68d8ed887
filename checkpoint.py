"""
Checkpoints: one folder per save, readable without this code.

    ckpt_0001200/
        model.safetensors      EMA weights ("ema.<name>") and raw weights ("raw.<name>"), fp32
        optimizer.safetensors  AdamW state ("<param name>/<state key>")
        config.json            the model's Config
        tokenizer.json         the caption tokenizer
        train_state.json       step, the run's arguments, how its randomness is seeded

A run folder (train.py --out) holds its newest complete checkpoint and a `latest` file naming
it. A save is written to a temp folder, renamed into place, and only then does `latest` move, so
a run killed at any moment leaves the previous checkpoint intact.

An exported checkpoint (train.py --export) holds model.safetensors with the EMA weights only, in
bf16 ("ema.<name>"), config.json and tokenizer.json: what sample.py and evaluate.py need.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mofo
from common import UserError, atomic_write, staged_dir, write_json, write_text
from data import load_tokenizer, save_tokenizer

LATEST = "latest"  # a run folder's pointer file naming its newest complete checkpoint


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (train.py --out) whose `latest` file names one."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint folder not found: {path}")
    pointer = os.path.join(path, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            path = os.path.join(path, fh.read().strip())
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise UserError(f"{path} is not a checkpoint: {f} is missing")
    return path


def read_config(path: str) -> mofo.Config:
    """The Config in a checkpoint folder's config.json."""
    try:
        with open(os.path.join(path, "config.json")) as fh:
            raw = json.load(fh)
        return mofo.Config(**{f.name: raw[f.name] for f in fields(mofo.Config) if f.name in raw}).validate()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}/config.json: {e}") from None


def load_checkpoint(path: str, device: str | torch.device = "cpu", ema: bool = True,
                    dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint or run folder written by train.py.

    `ema` picks the EMA weights or the raw ones. The model is built on the meta device and the
    stored tensors are assigned straight onto `device` (no random initialisation that would be
    overwritten). With `dtype`, every weight is cast to it, except the depth head, which stays
    fp32 (mofo.FP32_MODULES). Raises UserError for a missing or malformed checkpoint.
    """
    path = resolve_checkpoint(path)
    cfg = read_config(path)
    device = torch.device(device)
    prefix = "ema." if ema else "raw."
    try:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt", device=str(device)) as f:
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"cannot read {path}/model.safetensors: {e}") from None
    with torch.device("meta"):
        model = mofo.MoFo(cfg)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise UserError(f"checkpoint {path} does not match its config.json "
                        f"({len(expected - set(state))} missing, {len(set(state) - expected)} unexpected "
                        f"{prefix[:-1]} tensors)")
    # Fresh allocations (copy=True): a tensor read from the file may sit at any offset of its
    # buffer, and CPU GEMMs may round differently on unaligned memory, breaking bit-exact resume.
    state = {k: v.to(torch.float32 if dtype is None or mofo.keeps_fp32(k) else dtype, copy=True)
             for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval(), load_tokenizer(os.path.join(path, "tokenizer.json"))


def save_checkpoint(out: str, step: int, model, ema, opt, tok, train_state: dict) -> str:
    """Write ckpt_<step>/ into a temp folder, rename it into place, then repoint `latest`."""
    name = f"ckpt_{step:07d}"
    tmp = os.path.join(out, f".tmp_{name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {f"ema.{k}": v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
    tensors.update({f"raw.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()})
    atomic_write(os.path.join(tmp, "model.safetensors"), lambda t: save_file(tensors, t))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors = {f"{names[id(p)]}/{k}": v.detach().cpu().contiguous()
                   for p, st in opt.state.items() for k, v in st.items()}
    atomic_write(os.path.join(tmp, "optimizer.safetensors"), lambda t: save_file(opt_tensors, t))
    write_text(os.path.join(tmp, "config.json"), json.dumps(asdict(model.cfg), indent=2))
    save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
    write_json(os.path.join(tmp, "train_state.json"), train_state)
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run killed before publishing it
    os.rename(tmp, final)
    write_text(os.path.join(out, LATEST), name + "\n")
    _fsync_dir(out)
    for old in os.listdir(out):  # keep only the published checkpoint
        if old.startswith("ckpt_") and old != name:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def load_optimizer(path: str, model, opt) -> None:
    """Fill AdamW's state from optimizer.safetensors (keys '<param name>/<state key>')."""
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        opt.state[params[name]][k] = v.to(params[name].device, copy=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_checkpoint(src: str, dst: str) -> str:
    """Write the small inference checkpoint of `src` (a checkpoint or run folder) into `dst`: the
    EMA weights only, in bf16 except those mofo.keeps_fp32 names, with config and tokenizer."""
    src = resolve_checkpoint(src)
    try:
        tensors = load_file(os.path.join(src, "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"cannot read {src}/model.safetensors: {e}") from None
    ema = {k: v if mofo.keeps_fp32(k[len("ema."):]) else v.to(torch.bfloat16)
           for k, v in tensors.items() if k.startswith("ema.")}
    with staged_dir(dst) as tmp:
        save_file(ema, os.path.join(tmp, "model.safetensors"))
        for f in ("config.json", "tokenizer.json"):
            shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
    return dst
