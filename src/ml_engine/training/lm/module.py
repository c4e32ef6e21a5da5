"""One LightningModule for any registered causal language model (``kind=causal_lm``)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MeanMetric, MinMetric

from ml_engine.errors import UserError
from ml_engine.training.batches import plain_container
from ml_engine.training.lm import llama  # noqa: F401 (registers the llama network)
from ml_engine.training.lm.text_data import IGNORE_INDEX
from ml_engine.training.lm.tokenizer import CharTokenizer
from ml_engine.training.optimizers import ConfiguredOptimizers
from ml_engine.training.registry import build_network, register_module

log = logging.getLogger(__name__)


@register_module
class CausalLMModule(ConfiguredOptimizers):
    """Next-token cross-entropy, per token; ``val/loss`` is the mean over every prediction of
    the validation split and ``val/ppl`` its exponential.

    The network is built once the vocabulary is known: from the datamodule's tokenizer when
    training starts (``setup``), or from ``tokenizer`` and ``block_size`` saved in the
    checkpoint's hyperparameters, so ``load_from_checkpoint`` alone rebuilds model and tokenizer.
    At each validation a greedy sample from ``sample_prompt`` goes to TensorBoard (as text).
    """

    # what checkpoint errors say of this kind (training/checkpoints.py), and its data
    description: ClassVar[str] = "a language model"
    train_command: ClassVar[str] = "python train.py experiment=shakespeare_char"
    reads_text: ClassVar[bool] = True

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        scheduler_interval: str = "step",
        sample_prompt: str = "ROMEO:",
        sample_tokens: int = 200,
        tokenizer: dict[str, Any] | None = None,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "net": plain_container(net),
                "optimizer": plain_container(optimizer),
                "scheduler": plain_container(scheduler),
                "scheduler_interval": scheduler_interval,
                "sample_prompt": sample_prompt,
                "sample_tokens": sample_tokens,
                "tokenizer": plain_container(tokenizer),
                "block_size": block_size,
            }
        )
        self.net: torch.nn.Module | None = None
        self.tokenizer: CharTokenizer | None = None
        if tokenizer is not None and block_size is not None:
            self.build(CharTokenizer.from_config(self.hparams.tokenizer), block_size)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.val_loss_best = MinMetric()

    def build(self, tokenizer: CharTokenizer, block_size: int) -> None:
        """Build the network for ``tokenizer``'s vocabulary and record both in the hparams."""
        self.tokenizer = tokenizer
        self.hparams["tokenizer"] = tokenizer.to_config()
        self.hparams["block_size"] = int(block_size)
        net_kwargs = dict(self.hparams.net)
        self.net = build_network(
            net_kwargs.pop("name"),
            vocab_size=tokenizer.vocab_size,
            block_size=int(block_size),
            **net_kwargs,
        )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "use_tokenizer"):
            raise UserError(
                f"a causal language model needs a text datamodule, not "
                f"{type(datamodule).__name__}; use datamodule=text (or experiment=shakespeare_char)"
            )
        if self.net is None:
            self.build(datamodule.tokenizer, datamodule.hparams.block_size)
        else:  # restored: the checkpoint's vocabulary decides how the text is encoded
            datamodule.use_tokenizer(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {}).get("tokenizer")
        if saved is not None and saved != self.hparams.tokenizer:
            raise UserError(
                "the checkpoint's character vocabulary differs from the one of this run's "
                "datamodule.path; resume on the text it was trained on"
            )

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over the batch's real targets, and how many there are."""
        inputs, targets = batch
        logits = self.net(inputs).float()  # the softmax in float32 under bf16 autocast too
        loss = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return loss, (targets != IGNORE_INDEX).sum()

    def on_train_start(self) -> None:
        # Lightning's sanity check runs validation first; it must not count towards the best.
        self.val_loss_best.reset()
        super().on_train_start()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, count = self._loss(batch)
        self.train_loss.update(loss.detach(), weight=count)
        size = len(batch[0])
        self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=size)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.val_loss.update(loss, weight=count)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted over every rank's windows
        self.val_loss.reset()
        self.val_loss_best(loss)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
        self.log("val/loss_best", self.val_loss_best.compute(), prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_sample()

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """Greedy continuation of ``prompt`` (default: the configured sample prompt)."""
        prompt = self.hparams.sample_prompt if prompt is None else prompt
        count = self.hparams.sample_tokens if max_new_tokens is None else max_new_tokens
        ids = self.tokenizer.encode(prompt).to(self.device)[None]
        out = self.net.generate(ids, count, temperature=0.0)
        return self.tokenizer.decode(out[0])

    def _log_sample(self) -> None:
        writers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or not self.trainer.is_global_zero or not self.hparams.sample_prompt:
            return
        text = self.sample()
        # an indented block: TensorBoard renders text as markdown, which would join the lines
        shown = "\n".join("    " + line for line in text.splitlines())
        for writer in writers:
            writer.experiment.add_text("val/sample", shown, global_step=self.global_step)
        log.info("sample at step %d: %r", self.global_step, text)
