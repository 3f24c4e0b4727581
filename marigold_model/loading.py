"""
Find and load Marigold weights (diffusers format) without touching the network.

A model is named by a Hugging Face id (resolved from the local cache only), a local diffusers
directory, or ``bundled:<name>`` for a model shipped in ``marigold_model/models``. The text
encoder is never kept: Marigold conditions on the empty prompt only, so its embedding is
computed once (or read from ``empty_text_embedding.safetensors`` beside the weights).
"""

from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import re

import torch

BUNDLED_PREFIX = 'bundled:'
BUNDLED_DIR = Path(__file__).resolve().parent / 'models'
EMPTY_TEXT_FILE = 'empty_text_embedding.safetensors'
CACHE_DIR = Path(os.environ.get('MARIGOLD_CACHE', Path.home() / '.cache' / 'marigold_ros'))


class WeightsNotFoundError(FileNotFoundError):
    """The requested weights are not on this machine."""


class WeightsDamagedError(WeightsNotFoundError):
    """A weights or config file is here but cannot be read (damaged or cut short)."""


def is_hub_id(model):
    """Tell whether a model name can only mean a Hugging Face hub id (``owner/name``)."""
    return (not model.startswith(BUNDLED_PREFIX) and not model.startswith(('.', '/', '~'))
            and re.fullmatch(r'[\w.-]+/[\w.-]+', model) is not None)


def _download_hint(model):
    """Return how to get the whole model again: ``hf download`` only for a hub id."""
    if is_hub_id(model):
        return f'download the whole model again (hf download {model})'
    return 'copy or export the whole model folder again'


@dataclass
class MarigoldComponents:
    """
    The parts of a Marigold model that inference needs (no text encoder).

    :param unet: the 8-channel-input UNet2DConditionModel
    :param vae: AutoencoderKL (or AutoencoderTiny)
    :param scheduler: the diffusers scheduler from the model folder
    :param empty_text_embedding: [1, tokens, dim] embedding of the empty prompt
    :param pipeline_config: model_index.json entries (default steps, resolution, ...)
    :param path: folder the weights were read from
    """

    unet: object
    vae: object
    scheduler: object
    empty_text_embedding: torch.Tensor
    pipeline_config: dict
    path: Path


def _missing_weights_message(model, looked_in):
    where = '\n  '.join(str(p) for p in looked_in)
    download = ''
    if is_hub_id(model):
        download = (f'  - download once (needs network): hf download {model}'
                    ' (or: huggingface-cli download ...), then run again; the local cache is'
                    ' used offline\n')
    return (
        f'Marigold weights {model!r} were not found on this machine.\n'
        f'Looked in:\n  {where}\n'
        'Provide them in one of these ways:\n'
        f'{download}'
        '  - name a local diffusers folder (model_index.json, unet/, vae/, scheduler/)\n'
        '  - or the bundled tiny model, bundled:marigold-tiny (a small demo model, not for'
        ' real use)')


def resolve_model_path(model, marker='model_index.json'):
    """
    Turn a model name into a local folder holding a diffusers-format model.

    Never opens a network connection: hub ids are looked up in the local cache only.

    :param model: HF id, local folder, or ``bundled:<name>``
    :param marker: file that a valid folder holds (model_index.json for a pipeline,
        config.json for a single model such as a tiny VAE)
    :return: Path of the model folder
    :raises WeightsNotFoundError: when the weights are not here, saying where it looked
    """
    if not model:
        raise ValueError('model name is empty')
    if model.startswith(BUNDLED_PREFIX):
        path = BUNDLED_DIR / model[len(BUNDLED_PREFIX):]
        if (path / marker).is_file():
            return path
        raise WeightsNotFoundError(_missing_weights_message(model, [path]))
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / marker).is_file():
            raise WeightsNotFoundError(
                f'{local} exists but is not a diffusers model folder (no {marker})')
        return local
    if model.startswith(('.', '/', '~')):
        raise WeightsNotFoundError(_missing_weights_message(model, [local]))
    from huggingface_hub import constants, snapshot_download
    try:
        path = Path(snapshot_download(model, local_files_only=True))
    except Exception as error:  # noqa: B902 - every hub failure means "not in the cache"
        raise WeightsNotFoundError(
            _missing_weights_message(model, [local, Path(constants.HF_HUB_CACHE)])) from error
    if not (path / marker).is_file():
        raise _incomplete(model, f'the cached snapshot {path} has no {marker}')
    return path


_WEIGHTS_NAME = 'diffusion_pytorch_model'
# The weights file names diffusers / transformers write, without and with a variant:
# NAME.safetensors, NAME-00001-of-00002.safetensors (shards), NAME.safetensors.index.json,
# NAME.fp16.safetensors, NAME.fp16-00001-of-00002.safetensors,
# NAME.safetensors.index.fp16.json (and the same with .bin).
_STANDARD_WEIGHTS = (r'{name}(?:-\d+-of-\d+)?\.(?:safetensors|bin)'
                     r'|{name}\.(?:safetensors|bin)\.index\.json')
_VARIANT_WEIGHTS = (r'{name}\.(?P<a>\w+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)'
                    r'|{name}\.(?:safetensors|bin)\.index\.(?P<b>\w+)\.json')


def _incomplete(model, what):
    return WeightsNotFoundError(
        f'the weights of {model!r} are incomplete: {what}.\n'
        f'An interrupted or partial download leaves this; {_download_hint(model)} '
        'or point the model at a complete diffusers folder')


def _damaged(model, path, what):
    return WeightsDamagedError(
        f'{path} of {model!r} is {what}.\n'
        f'An interrupted download or copy leaves this; {_download_hint(model)}')


def check_safetensors(path):
    """
    Return why a .safetensors file cannot be read, or '' when its header and size agree.

    The file is an 8-byte header length, a JSON header giving each tensor's byte range, and
    the data: a file shorter than the largest range end was cut short.
    """
    size = os.path.getsize(path)
    with open(path, 'rb') as stream:
        head = stream.read(8)
        if len(head) < 8:
            return f'cut short ({size} bytes, no header)'
        length = int.from_bytes(head, 'little')
        if length > size - 8:
            return f'cut short ({size} bytes, header of {length} bytes)'
        try:
            header = json.loads(stream.read(length))
            end = max((entry['data_offsets'][1] for key, entry in header.items()
                       if key != '__metadata__'), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return 'damaged (its header is not readable)'
    if size < 8 + length + end:
        return f'cut short ({size} of {8 + length + end} bytes)'
    return ''


def _read_json(path, model=''):
    """Read a JSON file of a model folder, naming the file when it is damaged."""
    try:
        with open(path) as stream:
            return json.load(stream)
    except (ValueError, UnicodeDecodeError) as error:
        raise _damaged(model, path, f'damaged (not valid JSON: {error})') from error


def _from_pretrained(load, folder, model, *args, **kwargs):
    """Call a diffusers loader; a failure caused by a damaged file names that file."""
    try:
        return load(*args, **kwargs)
    except Exception as error:  # noqa: B902 - any loader failure: look for a damaged file
        for path in sorted(Path(folder).glob('*.safetensors')):
            problem = check_safetensors(path)
            if problem:
                raise _damaged(model, path, problem) from error
        for path in sorted(Path(folder).glob('*.json')):
            _read_json(path, model)
        raise


def weights_variant(folder, model='', weights_name=_WEIGHTS_NAME):
    """
    Tell which weights a component folder (unet/, vae/) holds.

    A Hugging Face download with ``variant='fp16'`` (or ``--include '*fp16*'``) brings only
    ``diffusion_pytorch_model.fp16.safetensors``; diffusers loads those only when asked
    for the variant, and otherwise fails with an OSError about a missing file.

    :param folder: component folder
    :param model: model name for the error message
    :param weights_name: the weights file's stem (transformers' text encoder: 'model')
    :return: None for the standard weights, else the variant name (e.g. 'fp16')
    :raises WeightsNotFoundError: no config.json or no weights file, naming the folder
    """
    folder = Path(folder)
    if not (folder / 'config.json').is_file():
        raise _incomplete(model, f'{folder} has no config.json')
    stem = re.escape(weights_name)
    standard = re.compile(_STANDARD_WEIGHTS.format(name=stem))
    variant = re.compile(_VARIANT_WEIGHTS.format(name=stem))
    variants = set()
    for name in (p.name for p in folder.iterdir()):
        if standard.fullmatch(name):
            return None
        found = variant.fullmatch(name)
        if found:
            variants.add(found.group('a') or found.group('b'))
    if not variants:
        raise _incomplete(model, f'{folder} holds no {weights_name}.safetensors (nor .bin, '
                                 'nor a variant such as .fp16.safetensors)')
    return 'fp16' if 'fp16' in variants else sorted(variants)[0]


def _load_empty_text_embedding(path, device, dtype):
    """Read the cached [1, tokens, dim] empty-prompt embedding, or compute it once with CLIP."""
    from safetensors.torch import load_file, save_file
    beside = path / EMPTY_TEXT_FILE
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    cached = CACHE_DIR / f'empty_text_{key}.safetensors'
    for candidate in (beside, cached):
        if candidate.is_file():
            problem = check_safetensors(candidate)
            if problem:
                raise _damaged(str(path), candidate, problem)
            return load_file(candidate)['embedding'].to(device=device, dtype=dtype)
    if not (path / 'text_encoder').is_dir() or not (path / 'tokenizer').is_dir():
        raise WeightsNotFoundError(
            f'{path} has neither {EMPTY_TEXT_FILE} nor text_encoder/ and tokenizer/; '
            'Marigold needs the empty-prompt embedding')
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(path / 'tokenizer', local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(
        path / 'text_encoder', local_files_only=True,
        variant=weights_variant(path / 'text_encoder', str(path), 'model'))
    ids = tokenizer('', padding='do_not_pad', max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors='pt').input_ids
    with torch.inference_mode():
        embedding = encoder(ids)[0].float().contiguous()
    del encoder  # the text encoder is ~1.4 GB and never needed again
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        save_file({'embedding': embedding}, cached)
    except OSError:
        pass  # a read-only home only costs recomputing the embedding next time
    return embedding.to(device=device, dtype=dtype)


def read_pipeline_config(path, model=''):
    """Read model_index.json of a model folder; ``model`` names it in errors (default: path)."""
    return _read_json(Path(path) / 'model_index.json', model or str(path))


def _scheduler_class(path, model=''):
    import diffusers
    config = Path(path) / 'scheduler' / 'scheduler_config.json'
    if not config.is_file():
        raise _incomplete(model, f'{config} is missing')
    name = _read_json(config, model).get('_class_name', 'DDIMScheduler')
    if not hasattr(diffusers, name):
        raise ValueError(f'unknown scheduler class {name!r} in {path}/scheduler')
    return getattr(diffusers, name)


def load_components(model, device, dtype, tiny_vae=None):
    """
    Load U-Net, VAE, scheduler and the empty-text embedding of a Marigold model.

    :param model: model name as accepted by :func:`resolve_model_path`
    :param dtype: torch dtype for the weights
    :param tiny_vae: optional name of an AutoencoderTiny to use instead of the model's VAE
    :return: MarigoldComponents
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    path = resolve_model_path(model)
    config = read_pipeline_config(path, model)
    kwargs = {'torch_dtype': dtype, 'local_files_only': True}
    unet = _from_pretrained(
        UNet2DConditionModel.from_pretrained, path / 'unet', model,
        path, subfolder='unet', variant=weights_variant(path / 'unet', model), **kwargs)
    if unet.config.in_channels != 2 * unet.config.out_channels:
        raise ValueError(f'{path} is not a Marigold model: the U-Net takes '
                         f'{unet.config.in_channels} channels, expected 2 x '
                         f'{unet.config.out_channels}')
    if tiny_vae:
        tiny_path = resolve_model_path(tiny_vae, 'config.json')
        vae = _from_pretrained(
            AutoencoderTiny.from_pretrained, tiny_path, tiny_vae,
            tiny_path, variant=weights_variant(tiny_path, tiny_vae), **kwargs)
    else:
        vae = _from_pretrained(
            AutoencoderKL.from_pretrained, path / 'vae', model,
            path, subfolder='vae', variant=weights_variant(path / 'vae', model), **kwargs)
    scheduler = _scheduler_class(path, model).from_pretrained(path, subfolder='scheduler')
    embedding = _load_empty_text_embedding(path, device, dtype)
    unet.to(device).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    return MarigoldComponents(unet, vae, scheduler, embedding, config, path)
