"""
Checkpoints: one folder per save, readable without this code.

    ckpt_0001200/
        model.safetensors      EMA weights ("ema.<name>") and raw weights ("raw.<name>"), fp32
        optimizer.safetensors  AdamW state ("<param name>/<state key>")
        config.json            the model's Config
        tokenizer.json         the caption tokenizer
        train_state.json       step, the run's arguments, how its randomness is seeded

A run trained with FSDP (train.py --fsdp) keeps no optimizer.safetensors: every rank writes its
shards of the raw weights, the EMA and the AdamW state with torch.distributed.checkpoint (DCP)
into dcp/, and a resumed run reads them back, at any world size. model.safetensors is still
written whole (gathered to rank 0), so sampling and evaluation read every checkpoint alike.

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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import mofo
from common import UserError, atomic_write, staged_dir, write_json, write_text
from data import load_tokenizer, save_tokenizer

LATEST = "latest"  # a run folder's pointer file naming its newest complete checkpoint
SHARDS = "dcp"  # a checkpoint's subfolder of DCP shards (FSDP runs)


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
    try:
        with open(os.path.join(path, "config.json")) as fh:
            raw = json.load(fh)
        return mofo.Config(**{f.name: raw[f.name] for f in fields(mofo.Config) if f.name in raw}).validate()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}/config.json: {e}") from None


def load_checkpoint(path: str, device: str | torch.device = "cpu", ema: bool = True, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint or run folder written by train.py, with its EMA or raw weights
    assigned straight onto `device` (model_from_state: no random initialisation that would be overwritten).
    Raises UserError for a missing or malformed checkpoint."""
    path = resolve_checkpoint(path)
    cfg = read_config(path)
    device = torch.device(device)
    prefix = "ema." if ema else "raw."
    try:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt", device=str(device)) as f:
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise UserError(f"cannot read {path}/model.safetensors: {e}") from None
    try:
        model = model_from_state(cfg, state, device, dtype)
    except ValueError as e:
        raise UserError(f"checkpoint {path} does not match its config.json ({e} {prefix[:-1]} tensors)") from None
    return model, load_tokenizer(os.path.join(path, "tokenizer.json"))


def model_from_state(cfg: mofo.Config, state: dict[str, torch.Tensor], device: str | torch.device,
                     dtype: torch.dtype | None = None) -> mofo.MoFo:
    """A MoFo in eval mode holding `state` (fp32, or `dtype` except mofo.keeps_fp32) on `device`,
    built on the meta device first. Raises ValueError when the names do not match the config."""
    with torch.device("meta"):
        model = mofo.MoFo(cfg)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(f"{len(expected - set(state))} missing, {len(set(state) - expected)} unexpected")
    # Fresh allocations (copy=True): a tensor read from the file may sit at any offset of its
    # buffer; a copy is aligned the way a fresh run's weights are.
    state = {k: v.to(device, torch.float32 if dtype is None or mofo.keeps_fp32(k) else dtype, copy=True)
             for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def empty_model(path: str) -> tuple[mofo.MoFo, object]:
    """(model on the meta device, tokenizer) of a checkpoint: its shape without its weights."""
    path = resolve_checkpoint(path)
    with torch.device("meta"):
        model = mofo.MoFo(read_config(path))
    return model, load_tokenizer(os.path.join(path, "tokenizer.json"))


def save_checkpoint(out: str, step: int, model, ema, opt, tok, train_state: dict) -> str:
    """Write ckpt_<step>/ into a temp folder, rename it into place, then repoint `latest`."""
    name = f"ckpt_{step:07d}"
    tmp = os.path.join(out, f".tmp_{name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors = {f"{names[id(p)]}/{k}": v.detach().cpu().contiguous()
                   for p, st in opt.state.items() for k, v in st.items()}
    atomic_write(os.path.join(tmp, "optimizer.safetensors"), lambda t: save_file(opt_tensors, t))
    return _publish(out, name, tmp, ema.state_dict(), model.state_dict(), model.cfg, tok, train_state)


def save_sharded_checkpoint(out: str, step: int, model, ema, opt, tok, train_state: dict) -> str | None:
    """save_checkpoint for FSDP models, called on every rank: each rank writes its shards of the weights,
    EMA and AdamW state into dcp/ of the temp folder, rank 0 adds the gathered model.safetensors and
    the JSON files and publishes the folder. --out must be the same folder for every rank (a shared
    filesystem across nodes). Returns the checkpoint folder on rank 0, None on the others."""
    name, rank = f"ckpt_{step:07d}", dist.get_rank()
    tmp = os.path.join(out, f".tmp_{name}_sharded")  # one name for every rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    ema_full, raw_full = full_state_dict(ema), full_state_dict(model)
    # DCP returns on rank 0 after every rank has written (and fsynced) its files and rank 0 the
    # metadata, so the folder is complete when it is renamed.
    dcp.save(_sharded_state(model, ema, opt), checkpoint_id=os.path.join(tmp, SHARDS))
    return _publish(out, name, tmp, ema_full, raw_full, model.cfg, tok, train_state) if rank == 0 else None


def _publish(out: str, name: str, tmp: str, ema_state: dict, raw_state: dict, cfg: mofo.Config, tok,
             train_state: dict) -> str:
    """Add model.safetensors and the JSON files to `tmp`, rename it to out/name, repoint `latest`, drop older ones."""
    tensors = {f"ema.{k}": v.detach().float().cpu().contiguous() for k, v in ema_state.items()}
    tensors.update({f"raw.{k}": v.detach().float().cpu().contiguous() for k, v in raw_state.items()})
    atomic_write(os.path.join(tmp, "model.safetensors"), lambda t: save_file(tensors, t))
    write_text(os.path.join(tmp, "config.json"), json.dumps(asdict(cfg), indent=2))
    save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
    write_json(os.path.join(tmp, "train_state.json"), train_state)
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)  # a leftover from a run killed before publishing it
    os.rename(tmp, final)
    write_text(os.path.join(out, LATEST), name + "\n")
    fd = os.open(out, os.O_RDONLY)  # fsync the folder: the rename and the new `latest` reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
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


def is_sharded(path: str) -> bool:
    return os.path.isdir(os.path.join(path, SHARDS))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP model on rank 0's CPU ({} on the other ranks; all must call)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _sharded_state(model, ema, opt) -> dict:
    """What DCP saves and loads: this rank's shards of the weights, EMA and AdamW state, by parameter name."""
    return {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema),
            "optim": get_optimizer_state_dict(model, opt)}


def load_sharded(path: str, model, ema, opt) -> None:
    """Fill FSDP `model`, `ema` and `opt` from the dcp/ folder of a checkpoint (every rank calls;
    DCP reshards when the world size differs from the saving run's)."""
    state = _sharded_state(model, ema, opt)
    dcp.load(state, checkpoint_id=os.path.join(path, SHARDS))
    set_model_state_dict(model, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(model, opt, state["optim"])


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
