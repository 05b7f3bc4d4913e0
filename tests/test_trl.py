"""TRL compatibility: SFTTrainer's data path for image datasets supervises the same tokens as valign's collator."""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers
from packaging.version import Version
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from valign.checkpoint import load_checkpoint
from valign.data.adapters import adapt
from valign.data.sources import load_rows
from valign.modeling_valign import IGNORE_INDEX
from valign.train.collator import ConversationCollator
from valign.train.lora import add_lora, lora_config


def test_sft_trainer_collator_labels_and_loss_match_valigns(checkpoint, tmp_path):
    torch.manual_seed(0)
    model, processor = load_checkpoint(str(checkpoint))
    model = add_lora(model, lora_config(r=4, alpha=8, dropout=0.0))
    samples = [*adapt(load_rows("easy-vqa", "train", limit=4), "vqa")]
    # SFTTrainer takes a datasets.Dataset; an "image" column makes it a vision dataset.
    dataset = datasets.Dataset.from_list([{"image": s["image"], "messages": s["messages"]} for s in samples])
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )
    if Version(transformers.__version__) < Version("5.18"):
        # TRL's own limit, stated in README: on 4.x valign trains with its own collator (tests/test_training.py).
        with pytest.raises(ValueError, match=r"requires transformers>=5\.18"):
            SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
        return
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForVisionLanguageModeling) and collator.assistant_only_loss
    assert collator.chat_template is None  # valign's template has {% generation %} markers: TRL keeps it

    ours = ConversationCollator(processor)(samples)
    theirs = collator([dataset[i] for i in range(len(samples))])  # TRL passes pad_to_multiple_of to the processor

    # Both pad on the right, so the supervised positions line up without any shift.
    supervised = ours["labels"] != IGNORE_INDEX
    assert torch.equal(theirs["labels"] != IGNORE_INDEX, supervised)
    assert torch.equal(theirs["labels"][supervised], ours["labels"][supervised])
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(theirs[key], ours[key]), key
    # Each answer ends on <|im_end|>, so the model learns to stop (TRL 1.16 warns otherwise, wrongly, see report).
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(row[row != IGNORE_INDEX][-1] == im_end for row in theirs["labels"])

    # TRL's fused LM-head loss (model.base_model + lm_head, no logits) equals valign's own forward loss.
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(theirs))
    torch.testing.assert_close(trl_loss, trainer.model(**ours).loss, rtol=1e-5, atol=1e-6)
