"""Text encoding through ComfyUI's own CLIP, with a trainable token [V] in the slots ComfyUI's tokenizer gives it."""
from __future__ import annotations

import folder_paths
import torch

from ...training import conditioning, export


def _keep_inference_or_clone(t):
    return t if t.is_inference() else t.clone()


def _same(t):
    return t


class ComfyTextEncoder:
    """``encode(prompts, token) -> conditioning`` over a ComfyUI CLIP, as the training core expects.

    Without a token: ComfyUI's own encode under no_grad (the trainer caches it). With one: the prompt names the
    trained embedding as ``embedding:<name>``; the embedding file is written first (:meth:`write_embedding`), so
    ComfyUI's tokenizer puts its vectors exactly where a prompt at inference puts them; those vectors are then
    swapped for rows of the trainable token and the text encoder runs with autograd. ComfyUI's CLIP adds residuals
    in place and its weights are inference tensors, so the activations autograd saves are cloned as they are saved
    (the weights, never modified, are kept as they are).

    The token is ``(n_vectors, sum of widths)``: each text encoder's part side by side (:attr:`parts`; SDXL:
    CLIP-G then CLIP-L in the tokenizer's key order). ``adm``: ``pooled -> y`` for SDXL (the conditioning is then
    ``(context, y)``)."""

    def __init__(self, clip, adm=None):
        self.clip, self.adm = clip, adm
        cs = clip.cond_stage_model
        self.parts = []
        for key in clip.tokenize(""):
            encoder = getattr(cs, f"clip_{key}", None)
            if encoder is None or not hasattr(encoder, "transformer"):
                raise ValueError(f"token training needs CLIP text encoders; {type(cs).__name__} has no 'clip_{key}'")
            self.parts.append((key, encoder.transformer.get_input_embeddings().weight.shape[1]))
        self._written: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, tuple] = {}

    @property
    def file_parts(self) -> list[tuple[str, int]]:
        """The embedding file's keys (``clip_l``, ``clip_g``: the keys ComfyUI's tokenizers look up) and widths."""
        return [(f"clip_{k}", w) for k, w in self.parts]

    def _split(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for key, width in self.parts:
            out[key] = vectors[:, start:start + width]
            start += width
        return out

    def word_embedding(self, word: str) -> torch.Tensor:
        """``(1, width)``: the mean input embedding of ``word``'s tokens, per text encoder (a new token's start)."""
        tokens = self.clip.tokenize(word, return_word_ids=True)
        cs, vecs = self.clip.cond_stage_model, []
        for key, _ in self.parts:
            ids = [int(t) for t, _, wid in tokens[key][0] if wid != 0]
            if not ids:
                raise ValueError(f"the class word {word!r} gives no tokens")
            table = getattr(cs, f"clip_{key}").transformer.get_input_embeddings().weight
            vecs.append(table[ids].detach().float().mean(0).cpu())
        return torch.cat(vecs)[None].clone()

    def write_embedding(self, vectors: torch.Tensor, path: str, metadata=None, overwrite: bool = False) -> None:
        """Save ``vectors`` where ComfyUI's tokenizer finds them (``embedding:<file name>``)."""
        export.save_embedding(vectors, path, metadata, parts=self.file_parts, overwrite=overwrite)
        self._written = {k: v.detach().float().cpu().clone() for k, v in self._split(vectors).items()}

    def _conditioning(self, cond, pooled):
        cond = cond.float()
        return cond if self.adm is None else (cond, self.adm(pooled.float()))

    def _plain(self, prompt: str):
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            out = self._conditioning(cond, pooled)
        return tuple(c.detach().clone() for c in out) if isinstance(out, tuple) else out.detach().clone()

    def _slots(self, prompt: str):
        """ComfyUI's tokens of ``prompt`` and where the written embedding's vectors are: ``(key, section, index,
        row)``."""
        if prompt not in self._tokens:
            tokens = self.clip.tokenize(prompt)
            slots = []
            for key, _ in self.parts:
                for si, section in enumerate(tokens[key]):
                    for idx, entry in enumerate(section):
                        if not torch.is_tensor(entry[0]) or key not in self._written:
                            continue
                        rows = [r for r, v in enumerate(self._written[key]) if torch.equal(entry[0].float().cpu(), v)]
                        if rows:
                            slots.append((key, si, idx, rows[0]))
            if not slots:
                raise ValueError(f"the prompt {prompt!r} names no trained embedding that ComfyUI's tokenizer found "
                                 f"(embeddings folders: {folder_paths.get_folder_paths('embeddings')}); write it with "
                                 "write_embedding first")
            self._tokens[prompt] = (tokens, slots)
        return self._tokens[prompt]

    def _with_token(self, prompt: str, token: torch.Tensor):
        tokens, slots = self._slots(prompt)
        tokens = {k: [list(section) for section in v] for k, v in tokens.items()}
        parts = self._split(token)
        for key, si, idx, row in slots:
            entry = tokens[key][si][idx]
            tokens[key][si][idx] = (parts[key][row],) + tuple(entry[1:])
        cs = self.clip.cond_stage_model
        cs.reset_clip_options()  # as CLIP.encode_from_tokens, without its load_model (the trainer loaded it)
        if self.clip.layer_idx is not None:
            cs.set_clip_options({"layer": self.clip.layer_idx})
        with torch.autograd.graph.saved_tensors_hooks(_keep_inference_or_clone, _same):
            cond, pooled = cs.encode_token_weights(tokens)[:2]
            return self._conditioning(cond, pooled)

    def __call__(self, prompts, token):
        return conditioning.cat([self._plain(p) if token is None else self._with_token(p, token) for p in prompts])
