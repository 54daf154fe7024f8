"""The Train LoRA tab (Gradio 3.41, as the WebUI ships it), generated from TrainConfig's fields.

Every option is one component named after its field; sections follow the fields' groups; fields that do not apply
to the chosen algorithm, optimizer or preset are hidden. The Train button starts the run in the job manager and the
JavaScript side follows it through the WebUI's progress API (progress bar, live preview, Interrupt).
"""

from __future__ import annotations

import html
import json
import logging
import os
from typing import Any

from .. import config as cfgmod
from .. import presets
from ..config import TrainConfig
from ..errors import ConfigError, UserError
from . import host
from .job import MANAGER, status_html

log = logging.getLogger(__name__)

TAB_ID = "lora_trainer"
# Options the WebUI decides (the loaded model, its precision and attention) or that make no sense in a tab.
HIDDEN_IN_WEBUI = {"pretrained_model_name_or_path", "model_family", "vae", "v_parameterization", "device",
                   "mixed_precision", "sdpa", "xformers", "channels_last", "torch_compile", "save_json_only"}
SECTIONS = (("dataset", "Dataset"), ("network", "Network"), ("training", "Training"),
            ("performance", "Performance"), ("saving", "Saving"), ("samples", "Samples"), ("model", "Model"),
            ("logging", "Logging"))
# fields whose value decides which other fields apply
DRIVERS = ("network_module", "enable_bucket", "cache_latents", "lr_scheduler", "network_train_unet_only",
           "network_train_text_encoder_only", "tag_occurrence_txt_file")
NO_PRESET = "(none)"


def tab_fields() -> list[cfgmod.FieldSpec]:
    return [f for f in cfgmod.fields() if f.name not in HIDDEN_IN_WEBUI]


def webui_defaults() -> TrainConfig:
    """Defaults as the tab shows them: files go to the Lora folder (output_dir relative to it)."""
    return TrainConfig(output_dir="")


# ------------------------------------------------------------------------------------------------------------
# values <-> config


def display_value(spec: cfgmod.FieldSpec, value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(value)
    if spec.choices is not None:
        return str(value)
    return value


def config_from_values(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """The config the tab's components describe (raises ConfigError naming every bad field)."""
    base = base or webui_defaults()
    overrides = {}
    for name, value in values.items():
        spec = cfgmod.field_spec(name)
        if spec.choices is not None and spec.base_type is int and value not in (None, ""):
            value = int(value)
        overrides[name] = value
    return cfgmod.with_overrides(base, overrides)


def lenient_config(values: dict[str, Any]) -> TrainConfig:
    """Best effort for deciding visibility while the user is still typing: bad values fall back to defaults."""
    base = webui_defaults()
    good = {}
    for name, value in values.items():
        try:
            good[name] = cfgmod.coerce(name, int(value) if name == "max_token_length" and value else value)
        except (ValueError, UserError):
            continue
    try:
        return TrainConfig(**{**cfgmod.to_dict(base), **good})
    except TypeError:
        return base


def visibility(cfg: TrainConfig, preset: str | None) -> dict[str, bool]:
    shown = set(presets.applicable_fields(cfg, None if preset in (None, "", NO_PRESET) else preset))
    return {f.name: f.name in shown for f in tab_fields()}


# ------------------------------------------------------------------------------------------------------------
# model info, wizard


def model_info_html() -> str:
    model = host.loaded_model()
    if model is None:
        return "<b>No checkpoint loaded.</b> Load one in the checkpoint dropdown at the top of the page."
    try:
        family = host.model_family(model)
    except ValueError as e:
        return f"<b>{html.escape(str(e))}</b>: Train LoRA supports SD1.x, SD2.x and SDXL."
    v = " (v-prediction)" if getattr(model, "parameterization", "eps") == "v" else ""
    vae = host.loaded_vae_name() or "the checkpoint's own"
    return (f"<b>{html.escape(host.checkpoint_name(model))}</b> &middot; {family.upper()}{v} &middot; VAE: "
            f"{html.escape(vae)}")


def wizard_for(cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """Run the Performance Wizard on this GPU and the loaded model; returns (values, explanation HTML)."""
    import torch

    from .. import wizard
    from ..train import preflight

    model = host.loaded_model()
    if model is None:
        raise UserError("load a checkpoint first: the wizard sizes the run for the loaded model")
    device = host.devices().device
    held = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda") / 2**30
    hw = wizard.detect_hardware(torch.device(device), host_model_gb=held)
    images = preflight(cfg.replace(save_json_only=True, output_dir=os.path.join(host.lora_dir(), cfg.output_dir)))
    rec = wizard.recommend(hw, wizard.DatasetStats(images.num_train_images), cfg, host.model_family(model))
    values = {k: v for k, v in rec.values().items() if k not in HIDDEN_IN_WEBUI}
    rows = "".join(f"<tr><td>{html.escape(p.field)}</td><td>{html.escape(str(p.value))}</td>"
                   f"<td>{html.escape(p.reason)}</td></tr>" for p in rec.picks if p.field not in HIDDEN_IN_WEBUI)
    warn = "".join(f"<p class='lora-trainer-warning'>{html.escape(w)}</p>" for w in rec.warnings)
    if hw.device == "cuda":
        head = (f"<p>{html.escape(hw.name)}: {hw.total_vram_gb:.1f} GB, {hw.free_vram_gb:.1f} GB free (the loaded "
                f"model holds {held:.1f} GB); estimated peak {rec.estimated_peak_gb:.1f} GB</p>")
    else:
        head = f"<p>No CUDA GPU: the WebUI runs on the {html.escape(hw.device.upper())}; sizes are for its RAM.</p>"
    return values, f"{head}<table class='lora-trainer-table'>{rows}</table>{warn}"


# ------------------------------------------------------------------------------------------------------------
# Gradio


def build_tab():
    import gradio as gr

    specs = tab_fields()
    base = webui_defaults()
    shown = visibility(base, None)
    comps: dict[str, Any] = {}
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(elem_id=f"{TAB_ID}_model_row"):
            # a callable value is computed on every page load: the model may finish loading after the UI is built
            model_html = gr.HTML(model_info_html, elem_id=f"{TAB_ID}_model_info")
            model_refresh = gr.Button("Refresh model info", elem_id=f"{TAB_ID}_model_refresh")
        with gr.Row():
            preset = gr.Dropdown([NO_PRESET, *presets.PRESETS], value=NO_PRESET, label="Preset",
                                 elem_id=f"{TAB_ID}_preset")
            wizard_btn = gr.Button("Performance Wizard", elem_id=f"{TAB_ID}_wizard")
        wizard_html = gr.HTML(elem_id=f"{TAB_ID}_wizard_result")
        with gr.Row():
            params_path = gr.Textbox(label="Params file (JSON; kohya names)", elem_id=f"{TAB_ID}_params_path")
            load_btn = gr.Button("Load params", elem_id=f"{TAB_ID}_load")
            save_btn = gr.Button("Save params", elem_id=f"{TAB_ID}_save")
        for group, title in SECTIONS:
            with gr.Accordion(title, open=group in ("dataset", "network", "training"),
                              elem_id=f"{TAB_ID}_section_{group}"):
                for spec in (s for s in specs if s.group == group):
                    comps[spec.name] = _component(gr, spec, getattr(base, spec.name), shown[spec.name])
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary", elem_id=f"{TAB_ID}_train")
            queue_btn = gr.Button("Add to queue", elem_id=f"{TAB_ID}_queue")
            # "_interrupt": the WebUI's Esc shortcut clicks the current tab's interrupt button while it is shown
            stop_btn = gr.Button("Cancel", elem_id=f"{TAB_ID}_interrupt")
            pause_btn = gr.Button("Pause / Resume", elem_id=f"{TAB_ID}_pause")
            sample_btn = gr.Button("Sample now", elem_id=f"{TAB_ID}_sample")
            send_btn = gr.Button("Send to txt2img", elem_id=f"{TAB_ID}_send")
        task_id = gr.Textbox(visible=False, elem_id=f"{TAB_ID}_task")
        lora_prompt = gr.Textbox(lambda: _lora_prompt(), visible=False, elem_id=f"{TAB_ID}_lora_prompt")
        with gr.Column(elem_id=f"{TAB_ID}_results"):  # the WebUI's progress bar is inserted at its top
            status = gr.HTML(lambda: _refresh()[0], elem_id=f"{TAB_ID}_status")
            gallery = gr.Gallery(lambda: _refresh()[1], label="Samples", elem_id=f"{TAB_ID}_gallery", columns=4)
            with gr.Row():
                chart = gr.Image(lambda: _refresh()[2], label="Loss", show_label=False, elem_id=f"{TAB_ID}_chart",
                                 interactive=False)
                vram_chart = gr.Image(lambda: _refresh()[3], label="VRAM", show_label=False,
                                      elem_id=f"{TAB_ID}_vram_chart", interactive=False)
        refresh_btn = gr.Button("Refresh", elem_id=f"{TAB_ID}_refresh", visible=False)
        _wire(gr, comps, preset, model_html, model_refresh, wizard_btn, wizard_html, params_path, load_btn,
              save_btn, (train_btn, queue_btn), stop_btn, pause_btn, sample_btn, send_btn, task_id, lora_prompt,
              status, gallery, [chart, vram_chart], refresh_btn)
    tab.lora_trainer_components = comps  # for tests and for A1111's ui-config defaults
    return tab


def _component(gr, spec: cfgmod.FieldSpec, value: Any, visible: bool):
    label = spec.name
    info = spec.help + (f" (only with {spec.when_text})" if spec.when_text else "")
    common = dict(label=label, info=info, elem_id=f"{TAB_ID}_{spec.name}", visible=visible)
    if spec.base_type is bool:
        return gr.Checkbox(value=bool(value), **common)
    if spec.choices is not None:
        return gr.Dropdown([str(c) for c in spec.choices], value=str(value), **common)
    if spec.base_type in (int, float) and not spec.optional:
        return gr.Number(value=value, precision=0 if spec.base_type is int else None, **common)
    return gr.Textbox(value=display_value(spec, value), placeholder="empty = default" if spec.optional else None,
                      **common)


def _wire(gr, comps, preset, model_html, model_refresh, wizard_btn, wizard_html, params_path, load_btn, save_btn,
          train_buttons, stop_btn, pause_btn, sample_btn, send_btn, task_id, lora_prompt, status, gallery, charts,
          refresh_btn) -> None:
    names = list(comps)
    inputs = [comps[n] for n in names]

    def values_of(args) -> dict[str, Any]:
        return dict(zip(names, args))

    def on_visibility(preset_name, *args):
        vis = visibility(lenient_config(values_of(args)), preset_name)
        return [gr.update(visible=vis[n]) for n in names]

    for driver in (*DRIVERS, "optimizer_type"):
        if driver in comps:
            comps[driver].change(on_visibility, [preset, *inputs], inputs, show_progress=False)

    def on_preset(preset_name, *args):
        current = lenient_config(values_of(args))
        if preset_name in (None, "", NO_PRESET):
            vis = visibility(current, None)
            return [gr.update(visible=vis[n]) for n in names]
        cfg = presets.apply(preset_name, current)
        vis = visibility(cfg, preset_name)
        return [gr.update(value=display_value(cfgmod.field_spec(n), getattr(cfg, n)), visible=vis[n])
                for n in names]

    preset.change(on_preset, [preset, *inputs], inputs, show_progress=False)

    def on_optimizer(opt_name, *args):
        updates = learning_rates_for(opt_name, lenient_config(values_of(args)))
        return [gr.update(value=display_value(cfgmod.field_spec(n), updates[n])) if n in updates else gr.update()
                for n in names]

    if "optimizer_type" in comps:
        comps["optimizer_type"].input(on_optimizer, [comps["optimizer_type"], *inputs], inputs, show_progress=False)

    model_refresh.click(model_info_html, [], [model_html], show_progress=False)

    def on_wizard(*args):
        try:
            cfg = config_from_values(values_of(args))
            values, text = wizard_for(cfg)
        except UserError as e:
            return [gr.update() for _ in names] + [_error_html(e)]
        return [gr.update(value=display_value(cfgmod.field_spec(n), values[n])) if n in values else gr.update()
                for n in names] + [text]

    wizard_btn.click(on_wizard, inputs, [*inputs, wizard_html])

    def on_load(path, *args):
        from .. import kohya_config  # our JSON, a kohya_ss GUI JSON or an sd-scripts TOML

        try:
            current = lenient_config(values_of(args))
            loaded = kohya_config.load(path, base=current)
        except UserError as e:
            return [gr.update() for _ in names] + [_error_html(e)]
        cfg = loaded.config
        vis = visibility(cfg, None)
        notes = "".join(f"<br>not carried over: {html.escape(str(u))}" for u in loaded.unsupported)
        return [gr.update(value=display_value(cfgmod.field_spec(n), getattr(cfg, n)), visible=vis[n])
                for n in names] + [f"loaded {html.escape(path)} ({html.escape(loaded.format)}){notes}"]

    load_btn.click(on_load, [params_path, *inputs], [*inputs, status])

    def on_save(path, *args):
        try:
            cfg = config_from_values(values_of(args))
            path = path or os.path.join(host.lora_dir(), f"{cfg.output_name}_config.json")
            cfgmod.save_json(cfg, path)
        except UserError as e:
            return _error_html(e)
        return f"saved {html.escape(path)}"

    save_btn.click(on_save, [params_path, *inputs], [status])

    def on_train(id_task, *args):
        try:
            job = MANAGER.start(config_from_values(values_of(args)), id_task or "")
        except UserError as e:
            _finish_task(id_task)  # the page stops waiting for a task that will never run
            return _error_html(e)
        return status_html(job.status)

    def on_queue(*args):
        try:
            cfg = config_from_values(values_of(args))
            queue = MANAGER.enqueue(cfg)
        except UserError as e:
            return _error_html(e)
        return f"<p>added {html.escape(cfg.output_name)} to the queue</p>" + queue_html(queue)

    train_btn, queue_btn = train_buttons
    train_btn.click(on_train, [task_id, *inputs], [status], _js="lora_trainer_start")
    queue_btn.click(on_queue, inputs, [status], _js="lora_trainer_follow_queue")
    stop_btn.click(lambda: _when_running(MANAGER.stop, "cancelling after the current step; what was trained is "
                                                       "saved"), [], [status])
    pause_btn.click(_toggle_pause, [], [status])
    sample_btn.click(lambda: _when_running(MANAGER.sample, "a sample will be rendered after the current step"), [],
                     [status])
    refresh_btn.click(_refresh, [], [status, gallery, *charts, lora_prompt], show_progress=False)
    # the prompt is computed first, then the page's script gets the fresh value (not the one shown at load)
    send_btn.click(_lora_prompt, [], [lora_prompt]).then(None, [lora_prompt], [lora_prompt],
                                                          _js="lora_trainer_send_to_txt2img")


def learning_rates_for(optimizer: str, current: TrainConfig) -> dict[str, Any]:
    """Adaptive optimizers (Prodigy, DAdaptAdam) want learning rates of 1; going back to another optimizer from
    such rates restores the defaults (1 would wreck AdamW)."""
    from ..optim import OPTIMIZERS, optimizer_defaults

    if OPTIMIZERS[optimizer].recommended_lr is not None:
        return optimizer_defaults(optimizer)
    if current.learning_rate >= 0.1:
        return {"learning_rate": TrainConfig().learning_rate, "unet_lr": None, "text_encoder_lr": None}
    return {}


def _finish_task(id_task: str | None) -> None:
    if id_task:
        progress = host.mod("progress")
        progress.add_task_to_queue(id_task)
        progress.finish_task(id_task)


def _when_running(action, message: str) -> str:
    if not MANAGER.busy():
        return "nothing is training"
    action()
    return message


def _toggle_pause() -> str:
    job = MANAGER.job
    if job is None or not MANAGER.busy():
        return "nothing is training"
    MANAGER.pause(not job.pause_requested)
    return "pausing after the current step" if job.pause_requested else "resuming"


def _refresh() -> tuple:
    """(status HTML, samples, loss chart, VRAM chart, prompt for txt2img) of the current or last run."""
    job = MANAGER.job
    if job is None:
        return queue_html(MANAGER.queue), [], None, None, ""
    cfg = job.effective_cfg or job.cfg
    charts = [os.path.join(cfg.resolved_log_dir, f"{cfg.output_name}_{kind}.png") for kind in ("loss", "memory")]
    samples = [p for p in job.status.samples if os.path.isfile(p)][-8:]
    return (status_html(job.status) + queue_html(MANAGER.queue), samples,
            *[c if os.path.isfile(c) else None for c in charts], _lora_prompt())


def queue_html(queue) -> str:
    """The queue under the status: one line per run with its state (and why, when it failed or was skipped)."""
    if queue is None or not queue.entries:
        return ""
    rows = "".join(f"<li>{e.position}. {html.escape(e.output_name)}: {e.state}"
                   f"{' - ' + html.escape(e.message) if e.message else ''}</li>" for e in queue.entries)
    return f"<div class='lora-trainer-queue'><b>Queue</b><ul>{rows}</ul></div>"


def _lora_prompt() -> str:
    """`<lora:name:1>` plus the trigger words (the class names of the training folders)."""
    job = MANAGER.job
    if job is None:
        return ""
    triggers = trigger_words(job.cfg.train_data_dir)
    final = job.status.final_file
    name = os.path.splitext(os.path.basename(final))[0] if final else job.cfg.output_name
    return ", ".join([*triggers, f"<lora:{name}:1>"])


def trigger_words(train_data_dir: str) -> list[str]:
    from ..data.dataset import _FOLDER_RE

    if not train_data_dir or not os.path.isdir(train_data_dir):
        return []
    words = []
    for name in sorted(os.listdir(train_data_dir)):
        m = _FOLDER_RE.match(name)
        if m and m.group(2).strip() and m.group(2).strip() not in words:
            words.append(m.group(2).strip())
    return words


def _error_html(e: Exception) -> str:
    lines = e.problems if isinstance(e, ConfigError) else [str(e)]
    return "<div class='lora-trainer-error'>" + "<br>".join(html.escape(x) for x in lines) + "</div>"


def config_json(values: dict[str, Any]) -> str:
    return json.dumps(cfgmod.to_dict(config_from_values(values)), indent=2)
