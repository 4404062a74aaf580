"""The CLaRa model: one causal LM, three roles as LoRA adapters on a shared base.

- compressor: document tokens + n_mem memory tokens -> the last hidden states at
  the memory positions, (n_mem, d). This is a document's memory.
- query reasoner: the same computation on a question with its own adapter and
  memory tokens -> (n_mem, d) in the same space; retrieval score = cosine of the
  flattened vectors.
- generator: reads memory vectors spliced into its input embeddings, then a
  prompt (question or instruction), and is trained by next-token loss on the target.

Sequences are laid out [memory | prompt | target] with padding anywhere, masked
out; position ids count only real positions, so padding never shifts a token.
All losses go through `forward` so DeepSpeed (ZeRO-3 included) sees every call.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from clara_ray.modeling.topk import retrieval_scores, select_memory, straight_through_topk

if TYPE_CHECKING:
    from clara_ray.training.settings import Distillation  # stage 3's settings: only read here

IGNORE_INDEX = -100


class Role(str, enum.Enum):
    COMPRESSOR = "compressor"
    QUERY_REASONER = "query_reasoner"
    GENERATOR = "generator"


class Objective(str, enum.Enum):
    COMPRESSOR_PRETRAINING = "compressor_pretraining"  # stage 1
    JOINT = "joint"  # stage 3


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, A) next-token cross-entropy of (B, A, V) logits against labels (0 where ignored)."""
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` holds, or weighted by a float `mask` whose weights
    sum to at least 1 (0 where it holds nowhere)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def memory_separation(
    memory: torch.Tensor, doc_ids: torch.Tensor, doc_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """How alike the memories of a batch's different documents are: the log of the mean
    of exp(cosine / temperature) over every pair of distinct documents, with memory
    flattened as the index scores it. memory: (N, n_mem, d); doc_ids, doc_mask: (N, T).

    Lowering it pushes documents apart, hardest the most alike (a small temperature
    weighs the closest pairs most). Documents that share their template and
    boilerplate differ only in name and value, so a compressor can only separate them
    by keeping those: the words a question asks by and for. A document read twice in
    the batch (same tokens) is not paired with itself. 0 when no pair is distinct.
    """
    flat = nn.functional.normalize(memory.flatten(1).float(), dim=-1)
    cosine = flat @ flat.T  # (N, N)
    tokens = doc_ids.masked_fill(doc_mask == 0, -1)
    distinct = (tokens.unsqueeze(1) != tokens.unsqueeze(0)).any(-1)  # (N, N), False on the diagonal
    if not distinct.any():
        return cosine.new_zeros(())
    scaled = cosine[distinct] / temperature
    return torch.logsumexp(scaled, 0) - math.log(scaled.numel())


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: (B, T) mask -> (B, T) positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ClaraModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_memory_tokens: int, lora: LoraSettings):
        super().__init__()
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
        )
        self.lm = get_peft_model(backbone, config, adapter_name=Role.COMPRESSOR.value)
        for role in (Role.QUERY_REASONER, Role.GENERATOR):
            self.lm.add_adapter(role.value, config)
        hidden_size = backbone.get_input_embeddings().embedding_dim
        self.num_memory_tokens = num_memory_tokens
        self.hidden_size = hidden_size
        # Learned memory-token embeddings, one set per encoding role (modules, not
        # bare parameters, so ZeRO-3 gathers them like any other weight).
        self.memory_tokens = nn.ModuleDict(
            {role.value: nn.Embedding(num_memory_tokens, hidden_size) for role in (Role.COMPRESSOR, Role.QUERY_REASONER)}
        )
        std = backbone.get_input_embeddings().weight.detach().float().std().item()
        for embedding in self.memory_tokens.values():
            nn.init.normal_(embedding.weight, std=std)
        # The query reasoner's per-slot retrieval gains, on a log scale (0 = gain 1 =
        # CLaRa's plain cosine). The base model's final norm gives every memory vector
        # about the same norm, so without them each slot weighs the same in the
        # flattened cosine and the query reasoner cannot lean on the slot that holds
        # the document's subject; see `encode`.
        self.retrieval_gain = nn.ModuleDict({Role.QUERY_REASONER.value: nn.Embedding(num_memory_tokens, 1)})
        for embedding in self.retrieval_gain.values():
            nn.init.zeros_(embedding.weight)
        # Memory standardisation, memory = (last hidden state - center) * scale, the
        # same for both encoding roles; identity (0, 1) unless `standardize_memory`
        # set it. Buffers, never trained; saved with the adapters.
        self.register_buffer("memory_center", torch.zeros(num_memory_tokens, hidden_size))
        self.register_buffer("memory_scale", torch.ones(()))
        self._trainable: dict[str, bool] = {}
        self.set_trainable(roles=(), backbone=False)

    # --- parameter groups -------------------------------------------------

    @property
    def decoder(self) -> nn.Module:
        """The transformer stack without the LM head (e.g. LlamaModel)."""
        return self.lm.get_base_model().base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_base_model().get_output_embeddings()

    def role_parameters(self, role: Role) -> dict[str, nn.Parameter]:
        tag = f".{role.value}."
        params = {n: p for n, p in self.named_parameters() if tag in n and "lora_" in n}
        for group in ("memory_tokens", "retrieval_gain"):
            modules = getattr(self, group)
            if role.value in modules:
                params.update({f"{group}.{role.value}.{n}": p for n, p in modules[role.value].named_parameters()})
        return params

    def retrieval_gain_parameters(self) -> dict[str, nn.Parameter]:
        return {f"retrieval_gain.{n}": p for n, p in self.retrieval_gain.named_parameters()}

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        return {
            n: p
            for n, p in self.named_parameters()
            if "lora_" not in n and not n.startswith(("memory_tokens.", "retrieval_gain."))
        }

    def set_trainable(self, roles, backbone: bool) -> None:
        """Make exactly the given roles' adapters (and optionally the base) trainable."""
        trainable = set()
        for role in roles:
            trainable.update(self.role_parameters(Role(role)))
        if backbone:
            trainable.update(self.backbone_parameters())
        self._trainable = {n: n in trainable for n, _ in self.named_parameters()}
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(self._trainable[name])

    def use(self, role: Role) -> None:
        """Route the LoRA layers through `role`'s adapter."""
        if self.lm.base_model.active_adapters == [role.value]:
            return  # peft's set_adapter would unmerge a merged adapter (see `merge_for_inference`)
        # peft's set_adapter also flips requires_grad; restore ours right after.
        self.lm.base_model.set_adapter(role.value)
        self._apply_trainable()

    def merge_for_inference(self, role: Role) -> None:
        """Fold `role`'s LoRA update into the base weights for inference-only use
        (corpus encoding): each layer then runs one matmul instead of three. Using
        another role afterwards unmerges first (peft), so results stay correct."""
        self.use(role)
        self.lm.base_model.merge_adapter([role.value])

    def copy_adapter(self, source: Role, target: Role) -> None:
        """Initialise `target`'s adapter (and memory tokens) from `source`'s; parameters
        `source` lacks (the query reasoner's retrieval gains) start afresh at 0."""
        source_params = self.role_parameters(source)
        target_params = self.role_parameters(target)
        with torch.no_grad():
            for name, param in target_params.items():
                counterpart = source_params.get(name.replace(target.value, source.value))
                if counterpart is None:
                    param.zero_()
                else:
                    param.copy_(counterpart)

    @torch.no_grad()
    def standardize_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Set the memory standardisation from the compressor's memory of sample documents.

        A pretrained LM's final hidden states share one large component. Untrained,
        SmolLM2-135M's memories of any two documents have a cosine near 0.9, and
        after 180 stage-1 steps without this 0.9999: the top-1 and the 64th
        candidate of a question then differ by ~1e-4 in cosine, below the fp16
        precision memory is stored in, so the differentiable top-k is flat; and the
        generator reads a near-constant input 20x the norm of its token embeddings
        (its answer loss came out the same whichever document it was given).
        Subtracting each slot's mean over the sample and scaling to the token
        embeddings' median norm fixes both; a from-scratch model, whose every
        weight trains, does not need it.
        """
        self.memory_center.zero_()
        self.memory_scale.fill_(1.0)
        memory, _ = self.encode(Role.COMPRESSOR, input_ids, attention_mask)  # (N, n, d)
        memory = memory.float()
        center = memory.mean(0)
        spread = (memory - center).norm(dim=-1).median()
        embeddings = self.lm.get_input_embeddings().weight.float().norm(dim=-1).median()
        self.memory_center.copy_(center)
        self.memory_scale.fill_((embeddings / spread.clamp(min=1e-6)).item())

    # --- the three computations ---------------------------------------------

    def encode(self, role: Role, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Memory vectors of a text: (B, T) -> (B, n_mem, d), plus token states.

        Returns (memory, token_states) where token_states are the
        last hidden states of the text tokens (B, T, d) for the alignment loss, not
        standardised (memory is; see `standardize_memory`).
        """
        if role not in (Role.COMPRESSOR, Role.QUERY_REASONER):
            raise ValueError(f"encode takes the compressor or query reasoner role, not {role}")
        self.use(role)
        batch_size = input_ids.shape[0]
        token_embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, d)
        slots = torch.arange(self.num_memory_tokens, device=input_ids.device)
        memory_embeds = self.memory_tokens[role.value](slots).unsqueeze(0).expand(batch_size, -1, -1)  # (B, n_mem, d)
        embeds = torch.cat([token_embeds, memory_embeds.to(token_embeds.dtype)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, self.num_memory_tokens)], dim=1)
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
        ).last_hidden_state  # (B, T + n_mem, d)
        memory = self._standardized(hidden[:, -self.num_memory_tokens :])
        if role.value in self.retrieval_gain:
            gain = self.retrieval_gain[role.value](slots).exp()  # (n_mem, 1)
            memory = memory * gain.unsqueeze(0).to(memory.dtype)
        return memory, hidden[:, : -self.num_memory_tokens]

    def _standardized(self, states: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        """(states - center) * scale; `center` defaults to each memory slot's (states: (..., n_mem, d))."""
        center = self.memory_center if center is None else center
        return (states - center.to(states.dtype)) * self.memory_scale.to(states.dtype)

    def _generator_embeddings(self, memory, prompt_ids, prompt_mask, memory_mask=None):
        """[memory | prompt] embeddings and mask. memory: (B, M, d); memory_mask: (B, M) or None."""
        prompt_embeds = self.lm.get_input_embeddings()(prompt_ids)  # (B, P, d)
        embeds = torch.cat([memory.to(prompt_embeds.dtype), prompt_embeds], dim=1)
        if memory_mask is None:
            memory_mask = prompt_mask.new_ones(memory.shape[:2])
        mask = torch.cat([memory_mask.to(prompt_mask.dtype), prompt_mask], dim=1)
        return embeds, mask

    def generator_loss(
        self, memory, prompt_ids, prompt_mask, target_ids, target_mask, memory_mask=None
    ) -> torch.Tensor:
        """Next-token loss on the target given memory (B, M, d) and a prompt (mean over all target tokens)."""
        logits, labels = self._target_logits(memory, prompt_ids, prompt_mask, target_ids, target_mask, memory_mask)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def generator_losses(self, memory, prompt_ids, prompt_mask, target_ids, target_mask) -> torch.Tensor:
        """(B,) next-token loss of each example, the mean over its own target tokens."""
        logits, labels = self._target_logits(memory, prompt_ids, prompt_mask, target_ids, target_mask)
        per_token = _token_losses(logits, labels)
        return per_token.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)

    def _target_logits(self, memory, prompt_ids, prompt_mask, target_ids, target_mask, memory_mask=None,
                       target_input_ids=None):
        """Logits predicting each target token, teacher-forced on `target_input_ids`
        (default the targets themselves; stage 1 may blank some, see batches.word_dropout)."""
        self.use(Role.GENERATOR)
        context_embeds, context_mask = self._generator_embeddings(memory, prompt_ids, prompt_mask, memory_mask)
        target_embeds = self.lm.get_input_embeddings()(target_ids if target_input_ids is None else target_input_ids)
        embeds = torch.cat([context_embeds, target_embeds], dim=1)
        mask = torch.cat([context_mask, target_mask], dim=1)
        hidden = self.decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
        ).last_hidden_state
        # The state at the last context position predicts target token 0, and so on.
        context_length = context_embeds.shape[1]
        predicting = hidden[:, context_length - 1 : -1]  # (B, A, d)
        logits = self.lm_head(predicting).float()  # (B, A, V)
        return logits, target_ids.masked_fill(target_mask == 0, IGNORE_INDEX)

    @torch.no_grad()
    def generate(
        self, memory, prompt_ids, prompt_mask, max_new_tokens: int, eos_token_id: int, memory_mask=None
    ) -> torch.Tensor:
        """Greedy decoding from [memory | prompt]; returns (B, <=max_new_tokens) ids."""
        from transformers import DynamicCache

        self.use(Role.GENERATOR)
        embeds, mask = self._generator_embeddings(memory, prompt_ids, prompt_mask, memory_mask)
        positions = positions_from_mask(mask)
        cache = DynamicCache()
        finished = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        generated = []
        for _ in range(max_new_tokens):
            hidden = self.decoder(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
            ).last_hidden_state
            next_token = self.lm_head(hidden[:, -1]).argmax(-1)  # (B,)
            next_token = next_token.masked_fill(finished, eos_token_id)
            generated.append(next_token)
            finished |= next_token == eos_token_id
            if finished.all():
                break
            embeds = self.lm.get_input_embeddings()(next_token).unsqueeze(1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return torch.stack(generated, dim=1)

    # --- training objectives (entered through forward for DeepSpeed) -----------

    def forward(self, objective: Objective, **batch) -> dict[str, torch.Tensor]:
        if objective == Objective.COMPRESSOR_PRETRAINING:
            return self._compressor_pretraining(**batch)
        if objective == Objective.JOINT:
            return self._joint(**batch)
        raise ValueError(f"unknown objective {objective!r}")

    def _compressor_pretraining(
        self, doc_ids, doc_mask, doc_group, doc_slot, memory_mask,
        prompt_ids, prompt_mask, target_ids, target_mask, is_qa, mse_weight: float, target_weight=None,
        separation_weight: float = 0.0, separation_temperature: float = 0.1, target_input_ids=None,
        qa_loss_share: float | None = None,
    ):
        """Stage 1: generate QA answers / reconstructions from documents' memory,
        plus MSE between each document's mean memory vector and mean token state.

        doc_ids: (N, T) all documents of the batch; document i is slot
        doc_slot[i] of example doc_group[i]. memory_mask: (B, M) real memory slots.
        is_qa: (B,) which examples are QA (the others reconstruct). The generation
        loss is the mean over all target tokens; the QA and reconstruction examples'
        own means are returned too: QA's few answer tokens weigh about a seventh
        against the documents' dozens, so a generator that never learns to read
        answers hides behind a low pooled loss. target_weight: (B, A) per-token weights
        (None = 1; ``batches.reconstruction_weights``), each a weighted mean.
        separation_weight: weight of `memory_separation` over the batch's documents.
        target_input_ids: what the generator is teacher-forced on (None = target_ids).
        qa_loss_share: None = the pooled token mean; a share s = s x the QA mean + (1 - s) x
        the reconstruction mean, when the batch has both kinds (one kind alone: its mean).
        """
        memory, token_states = self.encode(Role.COMPRESSOR, doc_ids, doc_mask)  # (N, n, d), (N, T, d)
        batch_size, width = memory_mask.shape
        n = self.num_memory_tokens
        grouped = memory.new_zeros(batch_size, width // n, n, memory.shape[-1])
        grouped = grouped.index_put((doc_group, doc_slot), memory)  # (B, slots, n, d)
        logits, labels = self._target_logits(
            grouped.flatten(1, 2), prompt_ids, prompt_mask, target_ids, target_mask, memory_mask, target_input_ids
        )
        per_token = _token_losses(logits, labels)
        real = (labels != IGNORE_INDEX).to(per_token.dtype)
        weight = real if target_weight is None else real * target_weight.to(per_token.dtype)
        qa_loss, reconstruction_loss = (_masked_mean(per_token, weight * rows[:, None]) for rows in (is_qa, ~is_qa))
        if qa_loss_share is not None and bool(is_qa.any()) and not bool(is_qa.all()):
            generation = qa_loss_share * qa_loss + (1 - qa_loss_share) * reconstruction_loss
        else:
            generation = _masked_mean(per_token, weight)
        weights = doc_mask.unsqueeze(-1).to(token_states.dtype)
        mean_tokens = (token_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        # In memory's standardised coordinates (affine, so standardising the mean is enough).
        mean_tokens = self._standardized(mean_tokens, self.memory_center.mean(0))
        mse = nn.functional.mse_loss(memory.mean(1).float(), mean_tokens.float())
        separation = memory_separation(memory, doc_ids, doc_mask, separation_temperature)
        loss = generation + mse_weight * mse
        if separation_weight:
            loss = loss + separation_weight * separation
        return {"loss": loss, "generation_loss": generation, "mse_loss": mse, "separation_loss": separation.detach(),
                "qa_loss": qa_loss.detach(), "reconstruction_loss": reconstruction_loss.detach()}

    def _joint(
        self, question_ids, question_mask, candidate_memory, prompt_ids, prompt_mask,
        target_ids, target_mask, k: int, temperature: float, sample: bool = False,
        distillation: Distillation | None = None, candidate_doc_ids=None, candidate_doc_mask=None,
        candidate_rows=None,
    ):
        """Stage 3: query reasoner scores L candidates, a differentiable top-k picks
        k of them (the best k, or a sample: ``straight_through_topk``), the generator
        answers from the picked memories. With `distillation`, the generator also
        answers from each of a few sampled candidates alone, and the query reasoner's
        softmax over those is pulled towards softmax(-loss) (``_loss_distillation``).

        candidate_memory: (B, L, n, d) stored memories, or None with a trainable
        compressor: then the batch's distinct candidates' tokens candidate_doc_ids /
        candidate_doc_mask (U, T) are compressed here, with gradient, and
        candidate_rows (B, L) says which of the U each candidate is."""
        if candidate_doc_ids is not None:
            fresh, _ = self.encode(Role.COMPRESSOR, candidate_doc_ids, candidate_doc_mask)  # (U, n, d)
            candidate_memory = fresh[candidate_rows]  # (B, L, n, d)
        query_memory, _ = self.encode(Role.QUERY_REASONER, question_ids, question_mask)  # (B, n, d)
        scores = retrieval_scores(query_memory, candidate_memory)  # (B, L)
        weights = straight_through_topk(scores, k, temperature, sample)  # (B, k, L)
        selected = select_memory(weights, candidate_memory)  # (B, k, n, d)
        generation = self.generator_loss(selected.flatten(1, 2), prompt_ids, prompt_mask, target_ids, target_mask)
        out = {"loss": generation, "generation_loss": generation, "scores": scores.detach()}
        if distillation is not None and distillation.candidates > 0:
            distilled = self._loss_distillation(scores, candidate_memory, prompt_ids, prompt_mask, target_ids,
                                                target_mask, distillation)
            out.update(loss=generation + distillation.weight * distilled, distillation_loss=distilled)
        return out

    def _loss_distillation(self, scores, candidate_memory, prompt_ids, prompt_mask, target_ids, target_mask,
                           distillation: Distillation) -> torch.Tensor:
        """Cross-entropy from softmax(-generator loss / target_temperature) to softmax(scores / temperature) over
        `distillation.candidates` candidates per question drawn without replacement from
        softmax(scores / temperature) (Gumbel top-k). The generator's losses are measured
        (no gradient) with each drawn candidate as its only document, so the query reasoner
        learns which of them, read alone, answers best: the right person's document, not
        only the right relation's."""
        batch, num_candidates = scores.shape
        s = min(distillation.candidates, num_candidates)
        tau = distillation.temperature
        with torch.no_grad():
            uniform = torch.rand_like(scores).clamp(min=torch.finfo(scores.dtype).tiny)
            drawn = (scores - tau * torch.log(-torch.log(uniform))).topk(s, dim=-1).indices  # (B, s)
            index = drawn[:, :, None, None].expand(-1, -1, *candidate_memory.shape[2:])
            memory = candidate_memory.gather(1, index)  # (B, s, n, d)
            repeat = lambda t: t.repeat_interleave(s, dim=0)  # noqa: E731
            losses = self.generator_losses(memory.flatten(0, 1), repeat(prompt_ids), repeat(prompt_mask),
                                           repeat(target_ids), repeat(target_mask)).view(batch, s)
            target = torch.softmax(-losses / distillation.target_temperature, dim=-1)
        log_q = torch.log_softmax(scores.gather(1, drawn) / tau, dim=-1)
        return -(target * log_q).sum(-1).mean()
