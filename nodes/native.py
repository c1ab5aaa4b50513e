"""The native path: UniAlignment's image stream as a ComfyUI MODEL, run by ComfyUI's own samplers.

    UniAlign Loader -> [UniAlign LoRA] -> UniAlign Native Model -> MODEL -> KSampler / SamplerCustomAdvanced
                                       -> UniAlign Native Text Encode -> CONDITIONING (positive, negative)
                                       -> UniAlign Native Image Conditioning -> CONDITIONING with reference_latents
                                       -> UniAlign Native VAE -> VAE (VAE Decode / VAE Encode)
    UniAlign Native Sigmas (MODEL -> SIGMAS) and UniAlign Native Noise (seed -> NOISE) give SamplerCustomAdvanced
    the all-in-one nodes' time grid and noise; KSampler with euler + "normal" has the same grid, and its noise is
    theirs for text-to-image.

The MODEL is a flow model (ComfyUI's ModelSamplingDiscreteFlow + CONST, the shift of the checkpoint's scheduler,
which ModelSamplingSD3 can change) in the SD3 latent format, so KSampler, SamplerCustomAdvanced, DualCFGGuider,
ModelSamplingSD3, ReferenceLatent and VAE Decode (with an SD3 VAE) work with it. Condition images travel as
ComfyUI's `reference_latents` (raw SD3 latents, as core's ReferenceLatent sets them) and go into the model as
extra image tokens, as `unialign_core.modes.edit`/`compose` do.

The MODEL shares the loaded weights and the LoRA patches of the UNIALIGN_MODEL it comes from: its ModelPatcher is
a clone of that model's patcher (the same torch module, made a ComfyUI BaseModel once), so ComfyUI never patches
the shared weights twice, whichever of the native and the all-in-one nodes runs first.

The rules (time grid, prompt encoding, condition latents, the model call) are in `unialign_core.native`; this file
only translates ComfyUI's types. On a ComfyUI without flow models (before SD3 support, June 2024) the nodes still
register; UniAlign Native Model and UniAlign Native Sigmas then refuse with a message.

LoRAs: LoraLoaderModelOnly works on the MODEL (core's hook LoRAs use the same key map; untested). Its transformer sits under `diffusion_model`
with diffusers' SD3 module names, so ComfyUI maps `diffusion_model.*` and kohya `lora_unet_*` keys itself; for the
diffusers/PEFT names (`transformer.*`, our trainer's files too) `install_lora_key_map` extends ComfyUI's LoRA key
map (`comfy.lora.model_lora_keys_unet`, which has no hook for models outside ComfyUI) with
`UniAlignBaseModel.unialign_lora_key_map`.
A LoRA from UniAlign LoRA and one from LoraLoaderModelOnly are patches of the same keys on clones of one patcher,
so each applies once, stacked. Not supported: saving the MODEL as a checkpoint.
"""

import contextlib
import functools
import logging
import weakref

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.supported_models_base

from ..unialign_core import native as core_native
from ..unialign_core.lora import PREFIXES as LORA_PREFIXES
from .image_types import InputError, core_inputs, image_to_core
from .model_cache import TRANSFORMER_PREFIX, output_device, place_unmanaged, same_device

log = logging.getLogger("UniAlignment")

CATEGORY = "UniAlignment/native"
MULTIPLIER = 1000  # the transformer reads the timestep as sigma * 1000


def native_support():
    """None when this ComfyUI can run the native MODEL, else why not (for the message)."""
    missing = [
        name
        for name, ok in (
            ("comfy.model_sampling.CONST", hasattr(comfy.model_sampling, "CONST")),
            (
                "comfy.model_sampling.ModelSamplingDiscreteFlow",
                hasattr(comfy.model_sampling, "ModelSamplingDiscreteFlow"),
            ),
            ("comfy.model_base.ModelType.FLOW", hasattr(comfy.model_base.ModelType, "FLOW")),
            ("comfy.conds.CONDList", hasattr(comfy.conds, "CONDList")),
        )
        if not ok
    ]
    if not missing:
        return None
    return (
        "this ComfyUI has no flow-matching models (it lacks " + ", ".join(missing) + "; they came with SD3 "
        "support in mid 2024): update ComfyUI to use the native nodes, or use the all-in-one UniAlign nodes"
    )


def _require_native(name):
    problem = native_support()
    if problem:
        raise InputError(name, problem)


# ---- the model -----------------------------------------------------------------------------------------------


def _latent_format(model):
    """ComfyUI's SD3 latent format with this model's VAE scaling (the same numbers for the released model)."""
    base = getattr(comfy.latent_formats, "SD3", comfy.latent_formats.LatentFormat)
    fmt = base()
    config = model.vae.config
    fmt.scale_factor = float(config.scaling_factor)
    fmt.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
    fmt.latent_channels = int(model.transformer.config.in_channels)
    if base is comfy.latent_formats.LatentFormat:  # no SD3 format: add its shift by hand

        def process_in(latent, f=fmt):
            return (latent - f.shift_factor) * f.scale_factor

        def process_out(latent, f=fmt):
            return latent / f.scale_factor + f.shift_factor

        fmt.process_in, fmt.process_out = process_in, process_out
    return fmt


def _model_config(model, shift):
    class UniAlignConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {}
        latent_format = comfy.latent_formats.LatentFormat
        memory_usage_factor = 1.2  # SD3-medium's

    config = UniAlignConfig({"in_channels": model.transformer.config.in_channels, "disable_unet_model_creation": True})
    config.sampling_settings = {"shift": float(shift), "multiplier": MULTIPLIER}
    config.latent_format = _latent_format(model)
    return config


class UniAlignBaseModel(comfy.model_base.BaseModel):
    """What ComfyUI's samplers call: `apply_model` (through BaseModel) -> `_apply_model` here, which runs the
    UniAlignment transformer the way the modes do. Mixed into the loaded weights module (`_as_base_model`);
    never built on its own, so BaseModel.__init__ (which would build a diffusion model) is not run."""

    def _init_native(self, model):
        shift = core_native.default_shift(model)
        config = _model_config(model, shift)
        self.__dict__["unialign_model"] = model  # the UniAlignModel (not a module: no new weights)
        self.unialign_scheduler_config = dict(model.scheduler_config)
        self.latent_format = config.latent_format
        self.model_config = config
        self.manual_cast_dtype = None  # computed in the model's dtype; fp8 block weights cast themselves per call
        self.device = getattr(self, "device", None)
        self.current_patcher = None
        self.model_type = comfy.model_base.ModelType.FLOW
        self.model_sampling = comfy.model_base.model_sampling(config, self.model_type)
        self.adm_channels = 0
        self.concat_keys = ()
        self.memory_usage_factor = config.memory_usage_factor
        self.memory_usage_factor_conds = ("ref_latents",)
        self.memory_usage_shape_process = {}

    @property
    def diffusion_model(self):
        """The transformer (diffusers layout), which some core nodes read, or what an object patch put in its
        place (e.g. TorchCompileModel's compiled transformer; it is called as the transformer is)."""
        return self.__dict__.get("_diffusion_model_patch") or self.unialign_model.transformer

    @diffusion_model.setter
    def diffusion_model(self, value):  # ComfyUI's object patches set it, and set the original back after
        self.__dict__["_diffusion_model_patch"] = None if value is self.unialign_model.transformer else value

    def __setattr__(self, name, value):
        if name == "diffusion_model":  # the property: the registered transformer (its keys) never changes
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def unialign_lora_key_map(self, key_map):
        """ComfyUI's LoRA key map (LoRA key prefix -> weight key) with the diffusers/PEFT names of our transformer
        (diffusers' SD3 module names): `transformer.`, `base_model.model.` and bare names, as UniAlign LoRA reads
        them, and OneTrainer/SimpleTuner's as ComfyUI maps them for SD3. Keys already mapped are kept."""
        prefix = TRANSFORMER_PREFIX
        for key in self.state_dict(keep_vars=True):
            if not (key.startswith(prefix) and key.endswith(".weight")):
                continue
            name = key[len(prefix) : -len(".weight")]
            flat = name.replace(".", "_")
            # the prefixes UniAlign LoRA reads (diffusion_model.* ComfyUI maps itself) and bare names, then the
            # flat names OneTrainer/SimpleTuner/LyCORIS files use for SD3
            aliases = [p + name for p in LORA_PREFIXES] + [name, f"lora_transformer_{flat}", f"lycoris_{flat}"]
            for alias in aliases:
                key_map.setdefault(alias, key)
        return key_map

    def state_dict_for_saving(self, *args, **kwargs):
        raise ValueError(
            "ComfyUI cannot save a UniAlignment MODEL as a checkpoint (its keys are not a model ComfyUI loads); "
            "save the model with `python -m unialign_core.convert` or the trainer's export instead"
        )

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if c_crossattn is None:
            raise ValueError("UniAlignment needs CONDITIONING from UniAlign Native Text Encode (it has no text)")
        model = self.unialign_model
        width = model.transformer.config.joint_attention_dim
        if c_crossattn.shape[-1] != width:
            raise ValueError(
                f"the conditioning has width {c_crossattn.shape[-1]}, but this model reads T5 states of width {width}: "
                "encode the prompts with UniAlign Native Text Encode, not a CLIP Text Encode node"
            )
        sigma = t
        dtype = model.dtype
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        device = xc.device
        timestep = self.model_sampling.timestep(t).float().to(dtype)
        context = mm.cast_to_device(c_crossattn, device, dtype)
        refs = [mm.cast_to_device(r, device, dtype) for r in (kwargs.get("ref_latents") or ())]
        options = transformer_options if transformer_options is not None else {}
        # ComfyUI's diffusion-model wrappers (e.g. EasyCache) see (x, timestep, context, refs, transformer_options)
        # and the velocity, as they see a core model's forward.
        v = _wrapped(self._velocity, self, options).execute(xc, timestep, context, refs, options)
        return self.model_sampling.calculate_denoised(sigma, v.float(), x)

    def _velocity(self, x, timestep, context, refs, transformer_options):
        model = self.unialign_model
        if self.diffusion_model is not model.transformer:  # patched (e.g. compiled): call it in the model's place
            model = _Transformer(self.diffusion_model)
        return core_native.velocity(model, x, timestep=timestep, context=context, conditions=refs)

    def extra_conds(self, **kwargs):
        out = {}
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        refs = kwargs.get("reference_latents", None)
        if refs:
            if len(refs) > core_native.MAX_CONDITIONS:
                log.warning(
                    "[UniAlign] %d reference latents; the model was trained with at most %d",
                    len(refs),
                    core_native.MAX_CONDITIONS,
                )
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(r) for r in refs])
        return out

    def extra_conds_shapes(self, **kwargs):
        refs = kwargs.get("reference_latents", None)
        if not refs:
            return {}
        channels = refs[0].shape[1]
        return {"ref_latents": [1, channels, sum(r.numel() for r in refs) // channels]}


class _Transformer:
    """A stand-in model whose transformer is another module (the patched diffusion_model)."""

    def __init__(self, transformer):
        self.transformer = transformer


def _wrapped(function, owner, transformer_options):
    """`function` behind ComfyUI's DIFFUSION_MODEL wrappers (an object with `execute(*args)`)."""
    try:
        from comfy import patcher_extension as ext
    except ImportError:  # an older ComfyUI: no wrappers
        ext = None
    if ext is None or not hasattr(ext, "WrapperExecutor"):

        class Plain:
            execute = staticmethod(function)

        return Plain
    wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, transformer_options)
    return ext.WrapperExecutor.new_class_executor(function, owner, wrappers)


_classes = {}


def _as_base_model(weights, model):
    """Make the loaded weights module (transformer + VAE, the UNIALIGN_MODEL's patcher's model) also a ComfyUI
    BaseModel, in place and once. Its weights, keys and patches stay as they are, so the all-in-one nodes
    see no difference, and ComfyUI sees the native MODEL and the UNIALIGN_MODEL as clones of one model."""
    if isinstance(weights, UniAlignBaseModel):
        return weights
    if getattr(weights, "transformer", None) is not model.transformer:
        raise RuntimeError("the loaded model's weights module does not hold its transformer; cannot make a MODEL")
    base = type(weights)
    cls = _classes.get(base)
    if cls is None:
        cls = type(f"UniAlignNative{base.__name__}", (base, UniAlignBaseModel), {"__module__": __name__})
        _classes[base] = cls
    weights.__class__ = cls
    weights._init_native(model)
    return weights


def _place_after_load(patcher, device_to, *args, **kwargs):
    """After ComfyUI loads the model (also in part, lowvram), the tensors it leaves on the offload device that do
    not cast per call (norms, the position table) go to the compute device, as the all-in-one nodes do."""
    if device_to is None:
        return
    if same_device(torch.device(device_to), torch.device(patcher.load_device)):
        place_unmanaged(patcher)


def install_lora_key_map():
    """Extend ComfyUI's `comfy.lora.model_lora_keys_unet` (what LoraLoader/LoraLoaderModelOnly and hook LoRAs map
    LoRA keys with) by a model's own `unialign_lora_key_map(key_map)` when it has one (only ours). Once per process."""
    try:
        import comfy.lora
    except ImportError:
        return False
    original = getattr(comfy.lora, "model_lora_keys_unet", None)
    if original is None or getattr(original, "unialign_key_map", False):
        return original is not None

    @functools.wraps(original)
    def model_lora_keys_unet(model, key_map=None):
        key_map = original(model, {} if key_map is None else key_map)
        extend = getattr(model, "unialign_lora_key_map", None)
        return extend(key_map) if callable(extend) else key_map

    model_lora_keys_unet.unialign_key_map = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet
    return True


def native_model(handle):
    """A ComfyUI ModelPatcher for the image stream of a UNIALIGN_MODEL (with its LoRAs)."""
    _as_base_model(handle.patcher.model, handle.model)
    patcher = handle.patcher.clone()
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:  # an older ComfyUI: no load callbacks
        CallbacksMP = None
    if CallbacksMP is not None and hasattr(patcher, "add_callback"):
        patcher.add_callback(CallbacksMP.ON_LOAD, _place_after_load)
    return patcher


# ---- nodes ---------------------------------------------------------------------------------------------------


def _unialign_input():
    return ("UNIALIGN_MODEL", {"tooltip": "The model from UniAlign Loader (optionally through UniAlign LoRA)."})


class UniAlignNativeModel:
    DESCRIPTION = (
        "UniAlignment's image stream as a ComfyUI MODEL: sample it with KSampler (euler + normal matches the "
        "all-in-one nodes), SamplerCustomAdvanced, DualCFGGuider (edit's image guidance), ModelSamplingSD3 (shift). "
        "Prompts come from UniAlign Native Text Encode, condition images from UniAlign Native Image Conditioning "
        "(or core's ReferenceLatent); the LATENT is SD3's, for VAE Decode with UniAlign Native VAE or an SD3 VAE. "
        "It shares the loaded weights and LoRAs of the input model (UniAlign Understand keeps working on that one)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A flow-matching MODEL in the SD3 latent format (16 channels), shift from the checkpoint.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _unialign_input()}}

    def convert(self, model):
        _require_native("model")
        return (native_model(model),)


@contextlib.contextmanager
def _t5_only(handle):
    """T5 on the compute device, and no transformer load around T5 calls (a text encode needs only T5)."""
    mm.load_models_gpu([handle.t5_patcher])
    place_unmanaged(handle.t5_patcher)
    model = handle.model
    scope, model.text_encoder_scope = model.text_encoder_scope, None
    try:
        yield model
    finally:
        model.text_encoder_scope = scope


class UniAlignNativeTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with the model's T5 exactly as the UniAlign nodes do (the model's token length, padded, "
        "no attention mask), as CONDITIONING for the native MODEL. Use one for the negative prompt too (empty is "
        "the published default). Warns on the node when the prompt is cut or T5 cannot read it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("T5 states of the prompt, for KSampler's positive or negative.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": _unialign_input(),
                "text": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "The prompt (or negative prompt). Plain English; T5 reads up to the model's "
                        "token length (256 for the released model), the rest is cut.",
                    },
                ),
            }
        }

    def encode(self, model, text):
        with core_inputs({"text": "text"}), _t5_only(model) as unialign:
            states, notes = core_native.encode_prompt(unialign, text, "text")
        for note in notes:
            log.warning("[UniAlign] %s", note)
        conditioning = [[states.to(output_device()), {}]]
        return {"ui": {"text": notes}, "result": (conditioning,)}


class UniAlignNativeImageConditioning:
    REFERENCES = ("image", "image_2", "image_3")
    DESCRIPTION = (
        "Adds condition images to the native conditioning: an edit or perception source (image; a batch edits each "
        "image), or 1-3 references to compose from. They are encoded with the model's VAE as the UniAlign nodes "
        "encode them (sampled with encode_seed) and set as reference_latents, like core's ReferenceLatent. "
        "positive and negative both get them (published edit CFG: the uncond keeps the source); "
        "negative_without_images is the negative as given, for DualCFGGuider's negative (image guidance: "
        "cond1 = positive, cond2 = negative, cfg_conds = guidance, cfg_cond2_negative = image guidance)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "negative_without_images", "latent")
    OUTPUT_TOOLTIPS = (
        "The positive with the images.",
        "The negative with the images.",
        "The negative without them (for DualCFGGuider's negative input).",
        "An empty SD3 latent of the first image's size and batch: an edit's output size.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        one = "sides a multiple of 16 (512x512 works best)"
        return {
            "required": {
                "model": _unialign_input(),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The prompt or instruction, from UniAlign Native Text Encode."},
                ),
                "negative": (
                    "CONDITIONING",
                    {
                        "tooltip": "The negative prompt (empty is the published default), from UniAlign Native Text Encode."
                    },
                ),
                "image": ("IMAGE", {"tooltip": f"The source to edit or analyse, or the first reference; {one}."}),
                # Not named "seed": the 2024 frontend would add a randomize-after-each-run control to it.
                "encode_seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seeds the VAE's sampling of the images (as published). The all-in-one "
                        "nodes use their seed here: the same value encodes the images identically.",
                    },
                ),
            },
            "optional": {
                "image_2": ("IMAGE", {"tooltip": f"A second reference (one image); {one}."}),
                "image_3": ("IMAGE", {"tooltip": f"A third reference (one image); {one}."}),
            },
        }

    def apply(self, model, positive, negative, image, encode_seed, image_2=None, image_3=None):
        given = [(n, i) for n, i in zip(self.REFERENCES, (image, image_2, image_3)) if i is not None]
        pixels = [image_to_core(i, n) for n, i in given]
        if len(pixels) > 1:
            for (name, _), p in zip(given, pixels):
                if p.shape[0] != 1:
                    raise InputError(name, f"give one image per reference, got a batch of {p.shape[0]}")
        names = [n for n, _ in given]
        unialign = model.activate(text_encoder_each_step=False)
        with core_inputs({n: n for n in names}):
            latents, _ = core_native.condition_latents(unialign, pixels, encode_seed, names)
        raw = [unialign.unscale_latents(z) for z in latents]  # ComfyUI's LATENT form, as ReferenceLatent passes
        device = output_device()
        raw = [r.to(device) for r in raw]
        empty = {"samples": torch.zeros_like(raw[0])}
        return (_with_refs(positive, raw), _with_refs(negative, raw), negative, empty)


def _with_refs(conditioning, latents):
    """A copy of CONDITIONING with `latents` appended to each entry's reference_latents."""
    out = []
    for entry in conditioning:
        options = dict(entry[1])
        options["reference_latents"] = list(options.get("reference_latents", [])) + list(latents)
        out.append([entry[0], options])
    return out


class UniAlignNativeSigmas:
    DESCRIPTION = (
        "The noise levels the all-in-one UniAlign nodes use (the checkpoint's FlowMatchEulerDiscreteScheduler "
        "grid) for SamplerCustom/SamplerCustomAdvanced, with the shift of the MODEL (ModelSamplingSD3 changes it). "
        "KSampler's 'normal' scheduler gives the same grid."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    FUNCTION = "sigmas"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from UniAlign Native Model (optionally ModelSamplingSD3)."}),
                "steps": (
                    "INT",
                    {
                        "default": 28,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "Denoising steps (28 published for text-to-image, 50 for edits).",
                    },
                ),
            }
        }

    def sigmas(self, model, steps):
        _require_native("model")
        base = model.model
        config = getattr(base, "unialign_scheduler_config", None)
        if config is None:
            raise InputError("model", "not a UniAlignment MODEL: connect UniAlign Native Model's output")
        shift = float(model.get_model_object("model_sampling").shift)
        return (core_native.native_sigmas(config, steps, 0, shift=shift),)


# The SD3 VAE's shape (stable-diffusion-3-medium vae/config.json): what ComfyUI's VAE class builds from 16 channels.
SD3_VAE_SHAPE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16}
_vaes = weakref.WeakKeyDictionary()  # UniAlignModel -> its ComfyUI VAE


def comfy_vae(vae):
    """A ComfyUI VAE (comfy.sd.VAE) with the weights of our SD3 VAE (a diffusers AutoencoderKL), or an InputError
    when it is not shaped like SD3's (ComfyUI builds the SD3 VAE from its keys only)."""
    import comfy.sd

    config = vae.config
    shape = {
        k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in ((k, getattr(config, k)) for k in SD3_VAE_SHAPE)
    }
    if shape != SD3_VAE_SHAPE:
        raise InputError(
            "model",
            f"this model's VAE is not shaped like SD3's ({shape}); ComfyUI's VAE nodes cannot build it. Decode with "
            "the all-in-one UniAlign nodes' images, or load an SD3 VAE with Load VAE",
        )
    state = {k: v.detach().to("cpu") for k, v in vae.state_dict().items()}
    return comfy.sd.VAE(sd=state)


class OwnVAE:
    """The model's VAE behind ComfyUI's VAE interface (what VAE Decode / VAE Encode call: `decode`, `encode`, their
    tiled forms, the compression ratios), for a VAE ComfyUI cannot build (not SD3's shape: small test and
    distilled models). Runs our diffusers VAE under the UNIALIGN_MODEL's patcher; LATENTs are raw, as ComfyUI's."""

    def __init__(self, handle):
        self.handle = handle
        config = handle.model.vae.config
        self.latent_channels = int(config.latent_channels)
        self.downscale_ratio = self.upscale_ratio = 2 ** (len(config.block_out_channels) - 1)
        self.output_device = output_device()
        self.latent_dim = 2

    def throw_exception_if_invalid(self):
        pass

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def decode(self, samples_in, vae_options=None):
        from ..unialign_core import vae as core_vae

        model = self.handle.activate(text_encoder_each_step=False)
        with torch.no_grad():
            scaled = model.scale_latents(samples_in.to(model.device, torch.float32))
            pixels = core_vae.decode(model.vae, scaled)
        return pixels.movedim(1, -1).to(self.output_device)

    def encode(self, pixel_samples):
        from ..unialign_core import vae as core_vae

        ratio = self.downscale_ratio
        h, w = (pixel_samples.shape[1] // ratio) * ratio, (pixel_samples.shape[2] // ratio) * ratio
        pixels = pixel_samples[:, :h, :w, :3].movedim(-1, 1)
        model = self.handle.activate(text_encoder_each_step=False)
        with torch.no_grad():
            raw = core_vae.posterior(model.vae, pixels).mean  # ComfyUI's VAE Encode takes the mean too
        return raw.float().to(self.output_device)

    def decode_tiled(self, samples, *args, **kwargs):
        return self.decode(samples)

    def encode_tiled(self, pixel_samples, *args, **kwargs):
        return self.encode(pixel_samples)


class UniAlignNativeVAE:
    DESCRIPTION = (
        "The model's own SD3 VAE as a ComfyUI VAE, for VAE Decode / VAE Encode with the native MODEL's latents "
        "(no separate SD3 VAE file needed). ComfyUI keeps its own copy of the VAE weights (~170 MB in fp16). "
        "A VAE not shaped like SD3's (small test models) runs as the UniAlign nodes run it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The SD3 VAE of the loaded model, for VAE Decode and VAE Encode.",)
    FUNCTION = "vae"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _unialign_input()}}

    def vae(self, model):
        key = model.model
        if key not in _vaes:
            try:
                _vaes[key] = comfy_vae(model.model.vae)
            except InputError as e:
                log.info("[UniAlign] %s: VAE Decode / Encode will run the model's own VAE", e)
                return (OwnVAE(model),)
        return (_vaes[key],)


class SeededNoise:
    """ComfyUI's NOISE interface (`seed`, `generate_noise(latent)`): the initial noise the all-in-one nodes draw
    for a seed, after the VAE samples of the condition images they encode first (`unialign_core.native`)."""

    def __init__(self, seed, condition_shapes=()):
        self.seed = seed
        self.condition_shapes = list(condition_shapes)

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        return core_native.initial_noise(self.seed, tuple(samples.shape), self.condition_shapes).to(samples.dtype)


class UniAlignNativeNoise:
    DESCRIPTION = (
        "The noise the all-in-one UniAlign nodes draw for a seed, for SamplerCustomAdvanced. For text-to-image it is "
        "KSampler's noise too; with condition images (from UniAlign Native Image Conditioning, encoded with the same "
        "seed) it continues after their VAE samples, as UniAlign Edit / Perceive / Compose do, so the same seed gives "
        "the same image as those nodes."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    FUNCTION = "noise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise_seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The seed (the all-in-one nodes' seed; UniAlign Native Image Conditioning's "
                        "encode_seed must be the same for an edit to match).",
                    },
                ),
            },
            "optional": {
                "conditioning": (
                    "CONDITIONING",
                    {
                        "tooltip": "The positive from UniAlign Native Image Conditioning: the noise then follows "
                        "its images' VAE samples. Leave it out for text-to-image."
                    },
                ),
            },
        }

    def noise(self, noise_seed, conditioning=None):
        shapes = []
        if conditioning:
            shapes = [tuple(r.shape) for r in conditioning[0][1].get("reference_latents", ())]
        return (SeededNoise(noise_seed, shapes),)


if native_support() is None:
    install_lora_key_map()

NODE_CLASS_MAPPINGS = {
    "UniAlignNativeModel": UniAlignNativeModel,
    "UniAlignNativeTextEncode": UniAlignNativeTextEncode,
    "UniAlignNativeImageConditioning": UniAlignNativeImageConditioning,
    "UniAlignNativeSigmas": UniAlignNativeSigmas,
    "UniAlignNativeNoise": UniAlignNativeNoise,
    "UniAlignNativeVAE": UniAlignNativeVAE,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "UniAlignNativeModel": "UniAlign Native Model",
    "UniAlignNativeTextEncode": "UniAlign Native Text Encode",
    "UniAlignNativeImageConditioning": "UniAlign Native Image Conditioning (edit / perceive / compose)",
    "UniAlignNativeSigmas": "UniAlign Native Sigmas",
    "UniAlignNativeNoise": "UniAlign Native Noise",
    "UniAlignNativeVAE": "UniAlign Native VAE",
}
