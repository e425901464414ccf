"""One training run from a ``TrainerConfig``: the steps of the training pod (and of the local quickstart).

The steps, top to bottom in ``train``:

1. locate inputs: local paths are used in place; ``s3://`` dataset/model URIs are synced into
   ``runtime.workDir`` (``visionft.storage``); ``builtin://`` ones are generated there
   (``visionft.job.builtin``);
2. load the dataset, pick the held-out split and, with ``evaluation`` (or the ``dataset.evalSamples``
   shorthand), choose and check its samples (``visionft.job.evaluation``; a setting the data can't serve
   fails here, before the model loads); then the model (``FastVisionModel.from_pretrained``), LoRA
   (``get_peft_model``), the optional fused kernels and the ``VisionDataCollator``. The engine's switches
   (``EngineOptions``: ``training.optimizations``, ``training.packing`` and the environment) are resolved
   once, before, and passed on from here; with ``training.packing``, architectures whose family does not
   pack are refused right after loading; families with fixed-shape rows (``ArchSpec.rows``) get a
   ``RowCollator`` whose rows keep one shape per tier, the others one row per batch without padding, with
   the packed attention installed once the kernels are in;
3. start the trackers (``visionft.tracking``: MLflow and/or TensorBoard event files), evaluate the base
   model, train with TRL's ``SFTTrainer`` (checkpoints every ``checkpointEverySteps``, each with a
   fingerprint of the model and recipe; resuming from the newest complete one, refused when it belongs to
   another model or recipe: ``visionft.job.resume``; evaluations every ``evaluation.everySteps``, the best
   one's adapter kept), and evaluate the output (the best adapter's weights with ``keepBest.useForOutput``);
   ``method: dpo`` trains on preference pairs with TRL's ``DPOTrainer`` instead and scores
   ``dataset.evalSamples`` held-out pairs by preference accuracy before and after (``visionft.job.preference``
   holds what it does its own way);
4. save adapters or merged weights, the loss plot (``loss.png``), ``metrics.json``, ``gallery.html`` and
   ``run.json`` (the summary, written last, so that its presence means the output folder is complete),
   upload to S3 when the output is an ``s3://`` URI, log the reports to the trackers, and print the summary
   table. With ``evaluation.failIfWorseThanBase`` and an output worse than the base model,
   ``WorseThanBaseError`` follows (the CLI's exit code 3).

Without ``output`` (allowed for a generated model only), the output folder is ``<workDir>/output`` and each
run starts from the first step: its checkpoints are a scratch copy, not a run to resume.

Errors in the config or the data raise ``ConfigError`` / ``BadSampleError`` / ``ValueError`` with a message
meant for the user; ``visionft.job.cli`` turns them into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visionft_api.recipe import is_builtin
from visionft_api.trainer_config import TrainerConfig

logger = logging.getLogger(__name__)

_EIGHT_BIT_OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


class ConfigError(ValueError):
    """The config cannot be run as written (a missing path, an impossible combination)."""


class WorseThanBaseError(RuntimeError):
    """The run finished and published its outputs, but ``evaluation.failIfWorseThanBase`` fails it: the
    output's headline metric is worse than the base model's."""


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        output_dir (str): the local output folder.
        steps (int): optimizer steps done.
        final_loss (float | None): the last logged training loss.
        eval_samples (int): how many held-out samples each evaluation scored (0: no evaluation).
        accuracy_before (float | None): a dpo run's held-out preference accuracy before training (None when
            not scored).
        accuracy_after (float | None): a dpo run's held-out preference accuracy after training.
        evaluation (dict | None): ``status.evaluation`` at the end: the headline metric of the base model,
            the output and the best evaluation, each with its step.
        skipped_samples (int): samples skipped under ``onBadSample: skip``.
        graphs (dict | None): CUDA-graph captures, replays, eager steps and the replay share of the
            training steps (None where the Trainer's own steps ran).
        rows (dict | None): with fixed-shape packing, the rows built, per tier, and the share of the
            token and vision budgets that samples filled.
        wall_seconds (float): the whole run's wall time.
        cpu_seconds (float): CPU time of the process (all threads): the work itself, whatever else shares
            the machine.
        saved (dict[str, str]): what was saved where (``adapter``, ``merged``, ``lossCurve``, ``metrics``,
            ``gallery``).
        tracking (dict | None): per tracker, how many calls failed and the first failure.
    """

    output_dir: str
    steps: int = 0
    final_loss: float | None = None
    eval_samples: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    evaluation: dict[str, Any] | None = None
    skipped_samples: int = 0
    graphs: dict | None = None
    rows: dict | None = None
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    saved: dict[str, str] = field(default_factory=dict)
    tracking: dict[str, Any] | None = None


def train(config: TrainerConfig, echo=print) -> RunResult:
    """Runs the whole flow (see the module docstring).

    Args:
        config (TrainerConfig): the validated config.
        echo (Callable[[str], None]): where the human-readable summary lines go. Default: ``print``.

    Returns:
        RunResult: the run's summary (also written to ``run.json`` in the output folder).

    Raises:
        WorseThanBaseError: ``evaluation.failIfWorseThanBase`` is set and the output's headline metric is
            worse than the base model's (raised after the outputs are published).
    """
    loaded: list = []
    try:
        return _train(config, echo, loaded)
    finally:
        # The kernels also swap functions of transformers' modules: the next model in this process (a
        # notebook's next run, a test) must find them as they were.
        from visionft import patching

        for model in loaded:
            patching.revert_optimizations(model)


def _train(config: TrainerConfig, echo, loaded: list) -> RunResult:
    """``train``, with the model put in ``loaded`` once it is built (for the revert)."""
    t0, cpu0 = time.monotonic(), time.process_time()
    from visionft.engine import distributed
    from visionft.engine.options import EngineOptions
    from visionft.job.reporting import ProgressCallback, StatusReporter

    # Under torchrun every rank runs this function; only rank 0 reports, writes outputs and tracks; every
    # rank takes its share of each evaluation.
    distributed.setup()
    main = distributed.is_main_process()
    target = config.runtime.status_target
    reporter = StatusReporter(target.namespace, target.name) if target and main else None
    progress = ProgressCallback(json_lines=config.runtime.json_progress and main, reporter=reporter)
    work = Path(config.runtime.work_dir)
    options = EngineOptions.from_recipe(config.training)

    _check_builtin_format(config)
    progress.stage("Downloading")
    output_uri = config.output.uri if config.output else None
    output_dir = work / "output" if output_uri is None or output_uri.startswith("s3://") else Path(output_uri)
    to_s3 = output_uri is not None and output_uri.startswith("s3://")
    with distributed.local_main_first():
        if output_uri is None and distributed.is_local_main_process():
            # No output to resume into: a scratch run (the quickstart) trains from the first step each time,
            # instead of resuming the previous run's last checkpoint (which would train zero steps).
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(output_dir / "best", ignore_errors=True)
        dataset_dir = _local_input(config.dataset.uri, work / "dataset", config, "dataset")
        model_dir = _local_input(config.model.uri, work / "model", config, "model")
    output_dir.mkdir(parents=True, exist_ok=True)
    n_pairs = 0  # held-out pairs a dpo run scores by preference accuracy
    if config.method == "dpo":
        from visionft.job import preference

    progress.stage("Loading")
    # The data first: a held-out split that can't serve the evaluation fails before the model loads.
    train_set, stage, held_out = _load_data(config, dataset_dir, output_dir)
    model, processor, patch_report, options = _load_model(config, model_dir, options)
    loaded.append(model)
    collator = _collator(config, model, processor, dataset_dir, options, patch_report, train_set)
    result = RunResult(output_dir=str(output_dir))
    if config.method == "dpo":
        n_pairs = min(config.dataset.eval_samples, len(held_out)) if held_out is not None else 0
        if config.dataset.eval_samples and held_out is None:
            echo(
                "visionft: dataset.evalSamples is set but there is no held-out split; "
                "set dataset.validationFraction"
            )
    tracking = _tracking(config, output_dir) if main else None

    def report(status: dict, where: str, state) -> None:
        progress.evaluation(status, where, state)

    if stage is not None:
        from visionft.job.reporting import console_line

        stage.attach(
            # Evaluation batches padded samples, not fixed-shape rows: the sample collator of a RowCollator.
            collator.collator if options.rows else collator,
            report=report if main else None,
            log_metrics=tracking.log_metrics if tracking is not None else None,
            # Above the progress bar when printing to the terminal.
            echo=(console_line if echo is print else echo) if main else (lambda line: None),
            publish_best=(lambda folder: _publish_best(config, folder)) if to_s3 else None,
            is_main=main,
        )

    trainer = _trainer(
        config,
        model,
        processor,
        train_set,
        collator,
        output_dir,
        progress,
        options,
        patch_report,
        stage,
        tracking,
    )
    distributed.barrier()  # each node's local main has fetched the newest S3 checkpoint by now
    resume = _newest_checkpoint(output_dir / "checkpoints")
    if resume:
        from visionft.job.resume import check_resume, fingerprint

        # Before any scoring or training: a checkpoint of another run is refused at once.
        check_resume(resume, fingerprint(config, model), model, output_uri or str(output_dir))
        echo(f"visionft: resuming from {resume}")
        if stage is not None and to_s3 and distributed.is_local_main_process():
            _sync_best(config, output_dir)
        distributed.barrier()
    if tracking is not None:
        from visionft.tracking import flat_params, load_state

        tracking.start(flat_params(_recipe_params(config)), resume=load_state(resume))
    if stage is not None:
        # The base model, also on a resumed run: the gallery's "before" answers and the comparison that
        # failIfWorseThanBase makes (greedy decoding gives the same answers each time).
        progress.stage("Evaluating")
        stage.evaluate_base(model)
        result.eval_samples = len(stage.samples)
    before = after = None
    if n_pairs and main:
        before = preference.preference_accuracy(model, collator, held_out, limit=n_pairs)
        result.accuracy_before, result.eval_samples = before.value, before.total
        echo(f"held-out preference accuracy before training: {before}")
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        if tracking is not None:
            tracking.finish("FAILED")
        raise
    result.steps = trainer.state.global_step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result.final_loss = losses[-1] if losses else None
    result.skipped_samples = collator.skipped
    if stage is not None:
        stage.finish(model, trainer.state.global_step)
    result.graphs = trainer.graph_summary()
    result.rows = trainer.row_summary()

    if not main:
        distributed.barrier()  # rank 0 saves and uploads below, then releases the others
        return result
    if n_pairs:
        after = preference.preference_accuracy(model, collator, held_out, limit=n_pairs)
        result.accuracy_after = after.value
        echo(f"held-out preference accuracy after training: {after}")

    progress.stage("Uploading" if to_s3 else "Saving", trainer.state)
    result.saved = _save(config, model, processor, output_dir, trainer.state.log_history, stage)
    if n_pairs:
        result.saved["preference"] = str(preference.write_report(output_dir, before, after))
    if stage is not None:
        result.evaluation = stage.record.status()
        result.saved.update(stage.write_reports(title=_run_name(config, output_dir)))
    if tracking is not None:
        tracking.finish("FINISHED", local_only=True)  # the event files are whole before they are published
        result.tracking = {"failures": dict(tracking.failures), "problems": dict(tracking.problems)}
    result.wall_seconds = round(time.monotonic() - t0, 1)
    result.cpu_seconds = round(time.process_time() - cpu0, 1)
    (output_dir / "run.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    if to_s3:
        _upload(config, output_dir)
    if tracking is not None:
        tracking.log_artifacts(_artifacts(config, output_dir))
        tracking.finish("FINISHED")
    progress.stage("Done", trainer.state)
    distributed.barrier()
    if result.graphs is not None:
        g = result.graphs
        echo(
            f"visionft: {g['replays']} of {g['replays'] + g['eager_steps']} training steps replayed from "
            f"CUDA graphs ({100 * g['replay_share']:.1f}%), {g['captured']} captured"
            + (f"; graphs off: {g['off']}" if g["off"] else "")
        )
    if result.rows is not None:
        r = result.rows
        echo(
            f"visionft: {r['rows']} packed rows (per tier {r['tier_rows']}, {r['samples_per_row']} samples "
            f"each on average), budgets filled {100 * r['token_fill']:.1f}% (tokens) and "
            f"{100 * r['patch_fill']:.1f}% (vision)"
            + (
                f"; {r['overflow_rows']} samples larger than every row trained in rows of their own"
                if r.get("overflow_rows")
                else ""
            )
        )
    if collator.skipped:
        echo(
            f"visionft: skipped {collator.skipped} bad samples (onBadSample: skip); last: "
            f"{collator.last_skip_reasons[-1]}"
        )
    if stage is not None:
        echo(stage.summary_table())
        echo(f"gallery: {result.saved['gallery']}")
    echo(
        f"done: {result.steps} steps, final loss {result.final_loss}, output in {output_dir}, "
        f"wall time {result.wall_seconds:.1f} s (CPU time {result.cpu_seconds:.1f} s)"
    )
    if stage is not None and stage.settings.fail_if_worse_than_base and stage.record.worse_than_base():
        record = stage.record
        raise WorseThanBaseError(
            f"the output's {record.metric} ({record.final.values[record.metric]:.4g}) is worse than the base "
            f"model's ({record.base.values[record.metric]:.4g}) and evaluation.failIfWorseThanBase is set; "
            f"the outputs are published in {output_uri or output_dir} for a look"
        )
    return result


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def _check_builtin_format(config: TrainerConfig) -> None:
    if is_builtin(config.dataset.uri) and config.dataset.format not in ("auto", "imagefolder"):
        raise ConfigError(
            f"dataset.format {config.dataset.format} can't read {config.dataset.uri}, a generated "
            "imagefolder: set dataset.format to auto or imagefolder"
        )


def _local_input(uri: str, scratch: Path, config: TrainerConfig, what: str) -> Path:
    """The local folder for ``uri``: the path itself, an S3 prefix synced into ``scratch``, or a generated
    source in ``<workDir>/builtin``."""
    if is_builtin(uri):
        from visionft.job import builtin

        return builtin.materialize(uri, Path(config.runtime.work_dir) / "builtin")
    if uri.startswith("s3://"):
        from visionft import storage

        return Path(storage.sync_down(uri, scratch, config.storage))
    path = Path(uri)
    if uri.startswith("/") and not path.exists():
        raise ConfigError(
            f"{what}.uri {uri} does not exist; check the path (relative paths are taken from "
            "the config file's folder)"
        )
    return path


def _upload(config: TrainerConfig, output_dir: Path) -> None:
    from visionft import storage

    assert config.output is not None  # only called for an s3:// output
    storage.upload_outputs(output_dir, config.output.uri, config.storage)


# ------------------------------------------------------------------------------------------------------
# Model, data, collator
# ------------------------------------------------------------------------------------------------------


def _load_model(config: TrainerConfig, model_dir: Path, options):
    """The model with LoRA and (as ``options`` say) the kernels and the packed attention, its processor,
    the ``PatchReport`` of the kernels, and ``options`` with the row layout settled for the model
    (``EngineOptions.for_model_type``)."""
    from visionft import FastVisionModel
    from visionft.engine import distributed

    m, lora, t = config.model, config.lora, config.training
    model, processor = FastVisionModel.from_pretrained(
        str(model_dir),
        device_map=distributed.device_map(),
        max_seq_length=m.max_seq_length,
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        dtype=None if m.dtype == "auto" else m.dtype,
        trust_remote_code=m.trust_remote_code,
    )
    _check_packing(options, model)
    options = options.for_model_type(getattr(model.config, "model_type", None))
    targets: Any = lora.target_modules_regex or (
        "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    )
    checkpointing = {"on": True, "off": False, "offload": "offload"}[t.gradient_checkpointing]
    model = FastVisionModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        finetune_vision_layers=lora.finetune_vision_layers,
        finetune_language_layers=lora.finetune_language_layers,
        finetune_attention_modules=lora.finetune_attention_modules,
        finetune_mlp_modules=lora.finetune_mlp_modules,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) or None,
        use_gradient_checkpointing=checkpointing,
        random_state=t.seed,
    )
    from visionft import patching

    kinds = {}
    if config.method == "dpo":
        from visionft.job.preference import PATCHES_OFF

        kinds = PATCHES_OFF
    patch_report = patching.apply_optimizations(model, optimizations=options.optimizations, **kinds)
    logger.info("optimizations=%s: %s", options.optimizations, patch_report)
    if options.packing and not options.rows:
        # Without it each sample of a packed row would attend to the samples before it. Fixed-shape rows
        # install their own attentions (``_collator``).
        patching.enable_packing(model)
    return model, processor, patch_report, options


def _check_packing(options, model) -> None:
    """training.packing needs an architecture whose family packs (fixed-shape rows or a packed attention):
    refused right after loading."""
    if not options.packing:
        return
    from visionft.model.architectures import packing_unsupported_reason

    reason = packing_unsupported_reason(getattr(model.config, "model_type", None))
    if reason:
        raise ConfigError(f"training.packing: {reason}; set training.packing to false")


def _load_data(config: TrainerConfig, dataset_dir: Path, output_dir: Path):
    """The training split, the evaluation stage (None without ``evaluation``; its held-out samples chosen and
    checked) and the held-out split (a dpo run's held-out pairs), None where the dataset has none."""
    from visionft.data.formats import MessagesFormatter, load_local_dataset
    from visionft.job.evaluation import EvaluationStage

    d = config.dataset
    splits = load_local_dataset(dataset_dir, d.format)
    stage, train_set, held_out = EvaluationStage.prepare(
        config, splits, output_dir, MessagesFormatter(d.columns, d.instruction)
    )
    if config.method == "dpo":
        from visionft.job.preference import check_columns

        try:
            check_columns(config, train_set, held_out)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    # The dataset index travels with each record so that a bad sample's error names it.
    train_set = train_set.add_column("__index__", list(range(len(train_set))))
    return train_set, stage, held_out


def _collator(config: TrainerConfig, model, processor, dataset_dir: Path, options, patch_report, train_set):
    """The batch builder: ``VisionDataCollator``, or with fixed-shape rows (``options.rows``) a
    ``RowCollator`` around it (rows sized from a probe of the training set; the row forward takes the
    fused kernels where ``patch_report`` says they were swapped in)."""
    from visionft.data.collator import VisionDataCollator
    from visionft.data.formats import MessagesFormatter
    from visionft.patching.rows import enable_rows

    d = config.dataset
    root = dataset_dir if dataset_dir.is_dir() else dataset_dir.parent
    if config.method == "dpo":
        from visionft.job import preference

        return preference.collator(config, model, processor, root)
    collator = VisionDataCollator(
        model,
        processor,
        max_seq_length=config.model.max_seq_length,
        train_on_responses_only=config.training.train_on_responses_only,
        max_image_pixels=d.max_image_pixels,
        on_bad_sample=d.on_bad_sample,
        dataset_root=root,
        formatter=MessagesFormatter(d.columns, d.instruction),
        packing=options.packing and not options.rows,
    )
    if not options.rows:
        return collator
    from visionft.data.row_collator import RowCollator, plan_rows

    family = enable_rows(model, collator.pad_token_id, fused=patch_report.enabled)
    tiers = plan_rows(collator, family, train_set, config.training.per_device_batch_size)
    return RowCollator(collator, family, tiers)


# ------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------


def _optimizer(name: str) -> str:
    if name not in _EIGHT_BIT_OPTIMIZERS:
        return name
    import torch

    try:
        import bitsandbytes
    except ImportError:
        bitsandbytes = None
    if torch.cuda.is_available() and bitsandbytes is not None:
        return _EIGHT_BIT_OPTIMIZERS[name]
    logger.warning("optimizer %s needs a CUDA GPU and bitsandbytes; using adamw_torch", name)
    return "adamw_torch"


def _trainer(
    config: TrainerConfig,
    model,
    processor,
    train_set,
    collator,
    output_dir: Path,
    progress,
    options,
    patch_report,
    stage,
    tracking,
):
    from visionft.engine import distributed
    from visionft.job.resume import fingerprint, fingerprint_callback

    args = _trainer_arguments(config, model, collator, output_dir)
    # Before the storage callback (added below), so that every uploaded checkpoint carries it.
    callbacks: list[Any] = [progress, fingerprint_callback(fingerprint(config, model))]
    if stage is not None:
        callbacks.append(stage.callback())
    if tracking is not None:
        from visionft.job.reporting import TrackingCallback

        callbacks.append(TrackingCallback(tracking))
    if distributed.is_distributed():
        from visionft.engine.checkpoint_rng import GatherRngStatesCallback

        # On every rank: brings each rank's RNG file into rank 0's checkpoint folder at each save.
        callbacks.append(GatherRngStatesCallback())
    if config.method == "dpo":
        from visionft.job import preference

        trainer_class, trainer_args = preference.trainer_setup(config, args)
    else:
        from trl import SFTConfig

        from visionft.engine.trainer import vision_sft_trainer_class

        trainer_class = vision_sft_trainer_class()
        trainer_args = SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    trainer = trainer_class(
        model=model,
        args=trainer_args,
        train_dataset=train_set,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
        engine_options=options,
        patch_report=patch_report,
    )
    _console(trainer, json_lines=config.runtime.json_progress)
    # Every node's local main fetches the newest complete S3 checkpoint (in the callback's constructor), so
    # that all ranks resume from one step; only rank 0 uploads new ones. Added after the RNG callback
    # (callbacks run in the order they were added), so each upload holds every rank's RNG file.
    storage_callback = _storage_callback(config, output_dir) if distributed.is_local_main_process() else None
    if storage_callback is not None and distributed.is_main_process():
        trainer.add_callback(storage_callback)
    return trainer


def _trainer_arguments(config: TrainerConfig, model, collator, output_dir: Path) -> dict[str, Any]:
    """The Trainer arguments of the recipe, shared by ``SFTConfig`` and ``DPOConfig``."""
    import torch

    from visionft.engine import distributed

    t = config.training
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cuda = torch.cuda.is_available()
    ddp = distributed.ddp_training_kwargs()
    if config.method == "dpo":
        # TRL decides for a DPO step: a text-only pair leaves the vision adapters without gradients, which
        # DDP's reducer must be told to expect (supervised steps average gradients without that reducer).
        ddp.pop("ddp_find_unused_parameters", None)
    return dict(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=_optimizer(t.optimizer),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=t.keep_checkpoints,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        # get_peft_model already set activation checkpointing as the recipe says; the Trainer must not
        # switch it on again (with its reentrant default).
        gradient_checkpointing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,  # the collator's skip counts live in this process
        include_num_input_tokens_seen=True,
        # The NaN filter reads each step's loss on the host right after backward, so the optimizer's
        # launches would wait for the device instead of queueing behind a graph replay.
        logging_nan_inf_filter=getattr(collator, "family", None) is None,
        report_to="none",
        # A pod prints JSON lines (runtime.jsonProgress); a terminal gets the progress bar, with the loss in it.
        disable_tqdm=config.runtime.json_progress,
        use_cpu=not cuda,
        **ddp,
    )


def _console(trainer, json_lines: bool) -> None:
    """The Trainer prints each log dict (its PrinterCallback, or its progress bar's ``write``); this run's
    own reports say the same once: JSON lines in a pod, a progress bar with the loss in it in a terminal."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as BarCallback

    from visionft.job.reporting import LossBar

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(BarCallback)
    if not json_lines:
        trainer.add_callback(LossBar())


def _storage_callback(config: TrainerConfig, output_dir: Path):
    """The checkpoint-upload callback of ``visionft.storage``, for s3:// outputs (None otherwise)."""
    if config.output is None or not config.output.uri.startswith("s3://"):
        return None
    from visionft import storage

    return storage.checkpoint_callback(
        config.output.uri, output_dir / "checkpoints", config.storage, keep=config.training.keep_checkpoints
    )


def _newest_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder that finished saving (its ``trainer_state.json`` is written
    after the weights and optimizer state), or None."""
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------


def _save(
    config: TrainerConfig, model, processor, output_dir: Path, log_history: list[dict], stage=None
) -> dict[str, str]:
    from visionft.job.plotting import save_loss_curve

    saved: dict[str, str] = {}
    method = config.output.save_method if config.output else "lora"
    if method == "lora":
        model.save_pretrained(str(output_dir / "adapter"))
        processor.save_pretrained(str(output_dir / "adapter"))
        saved["adapter"] = str(output_dir / "adapter")
    else:
        from visionft import patching

        # Merging reads every base weight; the patched model keeps the embedding table in host memory and
        # its LoRA forwards outside PEFT's modules, so the plain modules go back first.
        patching.revert_optimizations(model)
        model.save_pretrained_merged(str(output_dir / "merged"), processor, save_method=method)
        saved["merged"] = str(output_dir / "merged")
    metric = stage.record.metric if stage is not None else None
    base = stage.record.base.values.get(metric) if stage is not None and stage.record.base else None
    curve = save_loss_curve(log_history, output_dir / "loss.png", metric=metric, base=base)
    if curve is not None:
        saved["lossCurve"] = str(curve)
    return saved


def _publish_best(config: TrainerConfig, folder: Path) -> None:
    """Uploads ``<output>/best/`` (a new best evaluation's adapter) to the output URI at once."""
    from visionft import storage

    assert config.output is not None
    try:
        storage.upload_folder(folder, config.output.uri.rstrip("/") + "/best/", client=_client(config))
    except storage.StorageError as err:
        logger.warning("could not publish the best checkpoint yet (%s); the final upload has it", err)


def _client(config: TrainerConfig):
    from visionft import storage

    return storage.make_client(storage.settings_from_spec(config.storage))


def _sync_best(config: TrainerConfig, output_dir: Path) -> None:
    """A resumed run's best evaluation so far (``<output>/best/``, published at each new best) comes back
    from S3 with the checkpoint, so that keepBest still knows it."""
    from visionft import storage

    assert config.output is not None
    try:
        storage.sync_down(config.output.uri.rstrip("/") + "/best/", output_dir / "best", config.storage)
    except storage.StorageError as err:
        logger.warning("no earlier best evaluation to resume from (%s)", err)


# ------------------------------------------------------------------------------------------------------
# Tracking
# ------------------------------------------------------------------------------------------------------


def _run_name(config: TrainerConfig, output_dir: Path) -> str:
    target = config.runtime.status_target
    return config.runtime.run_name or (target.name if target else None) or output_dir.parent.name


def _tracking(config: TrainerConfig, output_dir: Path):
    """The run's trackers (``visionft.tracking``), not started yet."""
    from visionft.tracking import Tracking, sinks_for

    target = config.runtime.status_target
    tags = {"visionft.model": config.model.uri, "visionft.dataset": config.dataset.uri}
    if target is not None:
        tags["visionft.resource"] = f"{target.namespace}/{target.name}"
    return Tracking(
        sinks_for(config.tracking, output_dir, _run_name(config, output_dir), tags, config.storage)
    )


def _recipe_params(config: TrainerConfig) -> dict[str, Any]:
    """The recipe as tracked parameters: everything but where the trainer runs and the tracking itself."""
    raw = config.to_dict()
    for key in ("runtime", "tracking"):
        raw.pop(key, None)
    return raw


def _artifacts(config: TrainerConfig, output_dir: Path) -> list[tuple[Path, str]]:
    """``(local file, artifact path)`` for the tracker: the reports, and the adapter unless
    ``tracking.mlflow.logAdapter`` is off."""
    files = [(output_dir / name, name) for name in ("gallery.html", "metrics.json", "loss.png", "run.json")]
    mlflow = config.tracking.mlflow if config.tracking else None
    adapter = output_dir / "adapter"
    if mlflow is not None and mlflow.log_adapter and adapter.is_dir():
        files += [(f, f"adapter/{f.relative_to(adapter)}") for f in sorted(adapter.rglob("*")) if f.is_file()]
    return files
