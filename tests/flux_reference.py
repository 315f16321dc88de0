"""The PuLID-FLUX cross-attention re-stated from the reference (ToTheBeginning/PuLID ``pulid/encoders_transformer.py``
``PerceiverAttentionCA``), on a checkpoint's own tensors: the independent side of the PuLID-FLUX tests of both tiers."""
import torch
import torch.nn.functional as F


def reference_ca(sd, k, ids, img, heads):
    """PerceiverAttentionCA (encoders_transformer.py), from the file's tensors: LayerNorms, q from the image, k / v
    from the ID tokens, q and k each scaled by dim_head ** -0.25, softmax in float32."""
    p = {n: sd[f"pulid_ca.{k}.{n}"].float() for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                      "to_q.weight", "to_kv.weight", "to_out.weight")}
    x = F.layer_norm(ids, ids.shape[-1:], p["norm1.weight"], p["norm1.bias"])
    lat = F.layer_norm(img, img.shape[-1:], p["norm2.weight"], p["norm2.bias"])
    q = lat @ p["to_q.weight"].T
    kv = x @ p["to_kv.weight"].T
    key, val = kv[..., :kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:]

    def heads_of(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q, key, val = heads_of(q), heads_of(key), heads_of(val)
    s = 1 / (q.shape[-1] ** 0.25)
    w = torch.softmax(((q * s) @ (key * s).transpose(-2, -1)).float(), dim=-1)
    return (w @ val).transpose(1, 2).reshape(img.shape[0], img.shape[1], -1) @ p["to_out.weight"].T
