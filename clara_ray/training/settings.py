"""Typed settings of the training stages, built from the config tree at the edge.

Workers, step functions, benchmarks and sweeps take these frozen objects, never
the config tree or a flattened dict of it; enums stay enums.
"""

from __future__ import annotations

from dataclasses import dataclass

from clara_ray.config import (
    CompressorMode, Config, ConfigError, DType, ReconstructionOrder, ReconstructionWeighting,
    UnanswerableFrom, WorldSwap,
)


@dataclass(frozen=True)
class Lengths:
    doc: int
    question: int
    answer: int
    reconstruction: int


@dataclass(frozen=True)
class OptimiserSettings:
    learning_rate: float
    total_steps: int
    warmup_steps: int
    gradient_clipping: float
    gain_learning_rate: float | None = None  # own rate of the retrieval gains (stage 3); None: no own group
    # Updates after total_steps (stage 3's counterfactual worlds): a second cosine over
    # these many, from restart_ratio of the rate down to ``engine.COSINE_FLOOR``, no warm-up.
    extra_steps: int = 0
    restart_ratio: float = 0.0


@dataclass(frozen=True)
class Distillation:
    """Stage 3's loss distillation (``ClaraModel._loss_distillation``); candidates 0 = off."""

    candidates: int
    weight: float
    temperature: float  # of the query reasoner's softmax over the drawn candidates
    target_temperature: float = 1.0  # of softmax(-loss / target_temperature), the target


def annealed_temperature(step: int, total_steps: int, initial: float, final: float) -> float:
    """Temperature for `step` (1-based) of `total_steps`, geometric from `initial` to `final`.

    A warm start spreads the backward softmax over more candidates: with
    tau = 0.02 a candidate scored 0.1 below the top one gets exp(-5) of its
    weight and almost no gradient, so training can settle on whatever the
    untrained query reasoner ranks first; at tau = 0.1 it gets exp(-1).
    """
    if initial <= 0 or final <= 0:
        raise ValueError(f"temperatures must be > 0, got initial={initial}, final={final}")
    if not 1 <= step <= total_steps:
        raise ValueError(f"step must be in [1, {total_steps}], got {step}")
    progress = (step - 1) / max(1, total_steps - 1)
    return initial * (final / initial) ** progress


def _steps(config: Config, stage: str) -> int:
    steps = getattr(config, stage).steps
    if not isinstance(steps, int):
        raise ConfigError(f"{stage}.steps is {steps!r}: epochs become a step count when the training data is "
                          f"written (clara_ray.training.stages.steps_for_data), before a stage's settings are made")
    return steps


@dataclass(frozen=True)
class WorkerSettings:
    """How each training process runs, whatever the stage."""

    seed: int
    use_gpu: bool
    cpu_threads: int
    zero_stage: int
    bf16: bool
    lengths: Lengths

    @classmethod
    def from_config(cls, config: Config) -> WorkerSettings:
        model = config.model
        return cls(
            seed=config.run.seed,
            use_gpu=config.train.use_gpu,
            cpu_threads=config.train.cpu_threads_per_worker,
            zero_stage=config.train.zero_stage,
            bf16=model.dtype == DType.BFLOAT16,
            lengths=Lengths(
                doc=model.doc_max_len, question=model.question_max_len, answer=model.answer_max_len,
                reconstruction=model.reconstruction_max_len,
            ),
        )


def _optimiser(steps: int, learning_rate: float, warmup_fraction: float, gradient_clipping: float,
               gain_learning_rate: float | None = None, extra_steps: int = 0,
               restart_ratio: float = 0.0) -> OptimiserSettings:
    return OptimiserSettings(
        learning_rate=learning_rate, total_steps=steps, warmup_steps=int(warmup_fraction * steps),
        gradient_clipping=gradient_clipping, gain_learning_rate=gain_learning_rate,
        extra_steps=extra_steps, restart_ratio=restart_ratio,
    )


@dataclass(frozen=True)
class Stage1Settings:
    """Compressor pretraining (see ``clara_ray.config.Stage1Config`` for each knob)."""

    steps: int
    micro_batch_size: int
    optimiser: OptimiserSettings
    mse_weight: float
    qa_loss_share: float | None
    separation_weight: float
    separation_temperature: float
    reconstruction_word_dropout: float
    reconstruction_order: ReconstructionOrder
    reconstruction_weighting: ReconstructionWeighting
    counterfactual_rate: float
    counterfactual_of_kind: float
    hard_distractor_fraction: float
    single_document_steps: int  # QA examples read their gold document alone for steps 1..single_document_steps
    rival_steps: int  # then rivals join the distractors for this many steps
    min_context_docs: int
    max_context_docs: int
    question_memory_rate: float
    unanswerable_rate: float
    unanswerable_from: UnanswerableFrom
    train_backbone: bool
    report_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, config: Config) -> Stage1Settings:
        s1 = config.stage1
        steps = _steps(config, "stage1")
        return cls(
            steps=steps,
            micro_batch_size=s1.micro_batch_size_per_worker,
            optimiser=_optimiser(steps, s1.learning_rate, s1.warmup_fraction, config.train.gradient_clipping),
            mse_weight=s1.mse_weight,
            qa_loss_share=s1.qa_loss_share,
            separation_weight=s1.separation_weight,
            separation_temperature=s1.separation_temperature,
            reconstruction_word_dropout=s1.reconstruction_word_dropout,
            reconstruction_order=s1.reconstruction_order,
            reconstruction_weighting=s1.reconstruction_weighting,
            counterfactual_rate=s1.counterfactual_rate,
            counterfactual_of_kind=s1.counterfactual_of_kind,
            hard_distractor_fraction=s1.hard_distractor_fraction,
            single_document_steps=round(s1.single_document_fraction * steps),
            rival_steps=round(s1.rival_steps_fraction * steps),
            min_context_docs=s1.min_context_docs,
            question_memory_rate=s1.question_memory_rate,
            unanswerable_rate=s1.unanswerable_rate,
            unanswerable_from=s1.unanswerable_from,
            max_context_docs=s1.max_context_docs,
            train_backbone=config.model.train_backbone_in_stage1,
            report_every=s1.report_every,
            checkpoint_every=s1.checkpoint_every,
        )


@dataclass(frozen=True)
class Stage2Settings:
    """Instruction tuning (see ``clara_ray.config.Stage2Config``). The batching
    fields have stage 1's names: stage 2 draws its batches the same way, from QA
    examples only, each reading exactly `num_documents` documents whose others are
    the question's BM25 neighbours."""

    steps: int
    micro_batch_size: int
    optimiser: OptimiserSettings
    num_documents: int
    train_compressor: bool
    report_every: int
    checkpoint_every: int
    rival_steps: int = 0
    single_document_steps: int = 0
    counterfactual_rate: float = 0.0
    hard_distractor_fraction: float = 1.0
    reconstruction_order: ReconstructionOrder = ReconstructionOrder.FORWARD  # no reconstruction examples
    question_memory_rate: float = 0.0
    unanswerable_rate: float = 0.0
    unanswerable_from: UnanswerableFrom = UnanswerableFrom.RIVALS
    train_backbone: bool = False

    @property
    def min_context_docs(self) -> int:
        return self.num_documents

    @property
    def max_context_docs(self) -> int:
        return self.num_documents

    @classmethod
    def from_config(cls, config: Config) -> Stage2Settings:
        s2 = config.stage2
        steps = _steps(config, "stage2")
        return cls(
            steps=steps,
            micro_batch_size=s2.micro_batch_size_per_worker,
            optimiser=_optimiser(steps, s2.learning_rate, s2.warmup_fraction, config.train.gradient_clipping),
            num_documents=s2.num_documents,
            train_compressor=s2.train_compressor,
            report_every=s2.report_every,
            checkpoint_every=s2.checkpoint_every,
        )


@dataclass(frozen=True)
class Stage3Settings:
    """Joint training (see ``clara_ray.config.Stage3Config`` for each knob)."""

    steps: int  # all of them: the real schedule's, then the counterfactual worlds'
    schedule_steps: int  # the real schedule's: temperature, gains, anchor and learning rate run over these
    micro_batch_size: int
    optimiser: OptimiserSettings  # gain_learning_rate: the retrieval gains' own rate
    top_k: int
    temperature: float  # the real schedule's last step's, and every world step's
    initial_temperature: float  # the first step's (geometric annealing in between)
    gumbel_top_k: bool  # sample the k documents (Gumbel top-k) instead of taking the best k
    num_candidates: int
    distillation: Distillation  # candidates 0 = off
    distillation_start_step: int  # distillation counts after this step
    hold_gains_steps: int  # the gains stay at 1 for steps 1..hold_gains_steps
    anchor_weight: float
    anchor_start_step: int  # the pull back to the start counts after this step
    lower_anchor_weight: float  # the pull of the lower layers' LoRA, from the first step
    anchor_free_top_layers: int
    train_generator: bool
    report_every: int
    checkpoint_every: int
    trainable_compressor: bool = False  # candidates re-encoded with gradient every step
    refresh_every: int = 0  # steps between background index refreshes (0: after the last step only)
    counterfactual_rate: float = 0.0  # share of the world steps trained in a world (training/worlds.py)
    counterfactual_swap: WorldSwap = WorldSwap.VALUES  # what a world permutes
    counterfactual_worlds: int = 0  # fixed worlds to draw from (0: a fresh one every step)
    takeoff_recall: float = 0.0  # a real schedule fitting below this skips its world steps

    def temperature_at(self, step: int) -> float:
        """The top-k temperature of `step` (1-based): annealed over the real schedule,
        its last value after it."""
        return annealed_temperature(min(step, self.schedule_steps), self.schedule_steps, self.initial_temperature,
                                    self.temperature)

    @classmethod
    def from_config(cls, config: Config) -> Stage3Settings:
        s3 = config.stage3
        gains = s3.retrieval_gain_learning_rate
        steps = _steps(config, "stage3")  # the real schedule
        world_steps = s3.world_steps(steps)
        return cls(
            steps=steps + world_steps,
            schedule_steps=steps,
            micro_batch_size=s3.micro_batch_size_per_worker,
            optimiser=_optimiser(steps, s3.learning_rate, s3.warmup_fraction, config.train.gradient_clipping, gains,
                                 world_steps, s3.counterfactual_learning_rate_ratio),
            top_k=s3.top_k,
            temperature=s3.temperature,
            initial_temperature=s3.initial_temperature or s3.temperature,
            gumbel_top_k=s3.gumbel_top_k,
            num_candidates=s3.num_candidates,
            distillation=Distillation(s3.distillation_candidates, s3.distillation_weight, s3.distillation_temperature,
                                      s3.distillation_target_temperature),
            distillation_start_step=round(s3.distillation_start_fraction * steps),
            hold_gains_steps=round(s3.retrieval_gain_start_fraction * steps) if gains > 0 else 0,
            anchor_weight=s3.anchor_weight,
            anchor_start_step=round(s3.anchor_start_fraction * steps),
            lower_anchor_weight=s3.lower_anchor_weight,
            anchor_free_top_layers=s3.anchor_free_top_layers,
            train_generator=s3.train_generator,
            report_every=s3.report_every,
            checkpoint_every=s3.checkpoint_every,
            trainable_compressor=s3.compressor == CompressorMode.TRAINABLE,
            refresh_every=s3.refresh_every,
            counterfactual_rate=s3.counterfactual_rate,
            counterfactual_swap=s3.counterfactual_swap,
            counterfactual_worlds=s3.counterfactual_worlds,
            takeoff_recall=s3.takeoff_recall,
        )
