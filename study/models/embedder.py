"""A trained network kept for reuse: the file a final run leaves (MLflow artifact ``model.pt``) and the
:class:`Embedder` that embeds new images with it exactly as the run embedded its test images.

The file is a ``torch.save``-d dict of tensors and plain values, readable with ``weights_only=True``
(no pickled code): ``format``; ``model`` (backbone, backbone_options, embedding_dim, pooling, freeze_bn: enough to build
the architecture without downloading weights); ``weights``, the :class:`EmbeddingNet` state dict (trunk
and embedding head); ``preprocessing`` (``crop_size``, ``image_size``, ``max_aspect`` and ``input_size``,
the (H, W) arrays the network saw where known); ``loss`` (``name``, ``kwargs``, ``num_classes`` and
``weights``: its proxies, centers or unit); ``trial`` (the run's trial key) and ``dataset`` (its name).

Images go through the evaluation path of training: decoded like the image cache (shorter side to
``image_size``, the longer side cut to ``image_size × max_aspect``), the central ``crop_size`` crop, the
ImageNet normalisation, the network in float32; embeddings are L2-normalised.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from study.data.images import decode_image
from study.data.transforms import eval_transform
from study.losses import create_loss
from study.models.embedding import EmbeddingNet

FORMAT = 1  # bump when the file's layout changes; read_embedder refuses other versions


def embedder_bytes(
    model: dict[str, Any],
    weights: dict[str, torch.Tensor],
    preprocessing: dict[str, Any],
    loss: dict[str, Any],
    **about: Any,
) -> bytes:
    """The model file (see the module's docstring) as bytes; ``about``: ``trial``, ``dataset``."""
    buffer = io.BytesIO()
    state = {"format": FORMAT, "model": model, "weights": weights, "preprocessing": preprocessing, "loss": loss}
    torch.save(state | about, buffer)
    return buffer.getvalue()


def read_embedder(data: bytes, device: str | torch.device = "cpu") -> Embedder:
    """The :class:`Embedder` of a model file (:func:`embedder_bytes`), on ``device``."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"model file format {state.get('format')!r}; this dml-study reads format {FORMAT}")
    m = state["model"]
    # pretrained=False: the weights are in the file, nothing is downloaded
    net = EmbeddingNet(
        m["backbone"],
        m["embedding_dim"],
        False,
        pooling=m["pooling"],
        freeze_bn=m["freeze_bn"],
        backbone_options=m.get("backbone_options"),
    )
    net.load_state_dict(state["weights"])
    return Embedder(net.to(device).eval(), state)


class Embedder:
    """A final run's network, ready to embed images: :meth:`embed` takes uint8 arrays like the training
    data's, :meth:`embed_files` image files. ``info`` is the model file's content besides the weights
    (model, preprocessing, loss settings, trial, dataset)."""

    def __init__(self, net: EmbeddingNet, state: dict[str, Any]):
        self.net = net
        self.preprocessing = state["preprocessing"]
        self._loss = state["loss"]
        self.info = {k: v for k, v in state.items() if k != "weights"} | {
            "loss": {k: v for k, v in self._loss.items() if k != "weights"}
        }

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def embed(
        self,
        images: torch.Tensor | np.ndarray,
        widths: Sequence[int] | None = None,
        transposed: Sequence[bool] | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """L2-normalised float32 embeddings (N, embedding_dim) of uint8 images (N, 3, H, W), as the run
        computed its test embeddings. ``widths`` / ``transposed``: each image's valid width and orientation
        when they are rows of an image cache (zero-padded on the right; see :mod:`study.data.images`)."""
        images = torch.as_tensor(np.asarray(images))
        crop = self.preprocessing["crop_size"]
        out = []
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            geometry = {}
            if widths is not None:
                geometry["widths"] = torch.as_tensor(np.asarray(widths[start:stop]), dtype=torch.long)
                if transposed is not None:
                    geometry["transposed"] = torch.as_tensor(np.asarray(transposed[start:stop]), dtype=torch.bool)
            x = eval_transform(images[start:stop].to(self.device), crop=crop, **geometry)
            out.append(self.net(x).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.net.head.out_features), np.float32)

    def embed_files(self, paths: Sequence[str | Path], batch_size: int = 64) -> np.ndarray:
        """Embeddings of image files (any format PIL reads), decoded as the study's image cache decoded its
        dataset, in batches of ``batch_size``."""
        p = self.preprocessing
        size, crop, input_size = p["image_size"], p["crop_size"], p.get("input_size")
        if crop is None and input_size is None:
            raise ValueError(
                "this model was trained without train.crop_size on feature-mode inputs: embed_files cannot tell "
                "the width it saw; use embed() with arrays shaped like its training images"
            )
        max_width = round(size * p["max_aspect"]) if crop is not None else input_size[1]
        out = []
        for start in range(0, len(paths), batch_size):
            decoded = [decode_image(path, size, max_width) for path in paths[start : start + batch_size]]
            width = max_width if crop is None else max(pixels.shape[-1] for pixels, _ in decoded)
            batch = np.zeros((len(decoded), 3, size, width), np.uint8)  # left-aligned, zero-padded: the cache's layout
            for i, (pixels, _) in enumerate(decoded):
                batch[i, :, :, : pixels.shape[-1]] = pixels
            widths = [pixels.shape[-1] for pixels, _ in decoded]
            out.append(self.embed(batch, widths, [t for _, t in decoded], batch_size=batch_size))
        return np.concatenate(out) if out else np.zeros((0, self.net.head.out_features), np.float32)

    def loss_module(self) -> torch.nn.Module:
        """The run's loss with its trained parameters (proxies, centers, the PDDM unit), on the CPU."""
        loss = create_loss(
            self._loss["name"], self._loss["num_classes"], self.net.head.out_features, **self._loss["kwargs"]
        )
        loss.load_state_dict(self._loss["weights"])
        return loss
