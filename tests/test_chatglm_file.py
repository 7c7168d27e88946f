"""ChatGLM3 kept as one .safetensors file (models/LLM/chatglm3-fp16.safetensors of the Kolors node packs):
the prompt cache it makes equals the Kolors folder's, its tokenizer is found where those packs keep it,
the full-size structure follows from the shapes, and files that cannot serve are named."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tadisr_core.chatglm_file import chatglm_config, find_tokenizer, is_chatglm_file
from tadisr_core.kolors_files import KolorsFolderError
from tadisr_core.prompt import PromptCache, compute_prompt_cache_from_kolors, find_text_encoder, list_text_encoders
from tadisr_core.streaming import TensorInfo, WeightsHeader
from tests.hostile_files import json_only_text_encoder

KW = dict(max_length=32, dtype=torch.bfloat16, time_ids=(64, 64, 0, 0, 64, 64))


def _weights(tiny_dir) -> dict:
    return load_file(str(tiny_dir["kolors"] / "text_encoder" / "model.safetensors"))


def _single_file(tiny_dir, path, edit=lambda t: t):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(edit(_weights(tiny_dir)), str(path))
    return path


def _hf_names_fp16(tensors):  # chatglm3-6b's layout: the model under "transformer."
    return {f"transformer.{k}": v.half() for k, v in tensors.items()}


@pytest.mark.parametrize("layout", ["beside", "tokenizer-folder", "node-pack", "hf-names-fp16"])
def test_a_single_chatglm_file_makes_the_folders_prompt_cache(tiny_dir, tmp_path, layout):
    kolors = tiny_dir["kolors"]
    comfy = tmp_path / "ComfyUI"
    llm = comfy / "models" / "LLM"
    edit = _hf_names_fp16 if layout == "hf-names-fp16" else (lambda t: t)
    weights = _single_file(tiny_dir, llm / "chatglm3-fp16.safetensors", edit)
    tokenizer = {"beside": llm, "tokenizer-folder": llm / "tokenizer", "hf-names-fp16": llm,
                 "node-pack": comfy / "custom_nodes" / "ComfyUI-Kolors-MZ" / "configs" / "tokenizer"}[layout]
    shutil.copytree(kolors / "tokenizer", tokenizer, dirs_exist_ok=True)
    (comfy / "custom_nodes").mkdir(exist_ok=True)

    assert is_chatglm_file(weights) and find_text_encoder(weights) == (weights, tokenizer)
    ref = compute_prompt_cache_from_kolors(kolors, **KW)
    if layout == "hf-names-fp16":  # the folder's weights rounded to fp16 first, as the file holds them
        folder = tmp_path / "fp16"
        shutil.copytree(kolors, folder)
        save_file({k: v.half() for k, v in _weights(tiny_dir).items()},
                  str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
        ref = compute_prompt_cache_from_kolors(folder, **KW)
    cache = compute_prompt_cache_from_kolors(weights, **KW)
    assert cache.prompt_embeds.dtype == torch.float32 and cache.text_columns == ref.text_columns == (31,)
    assert torch.equal(cache.prompt_embeds, ref.prompt_embeds) and torch.equal(cache.text_embeds, ref.text_embeds)


def test_a_folders_chatglm3_computes_in_the_dtype_asked_for(tiny_dir, monkeypatch):
    """Defect: transformers before 4.50 ignore from_pretrained's torch_dtype for this model and keep the
    folder's own dtype (Kolors' config says float16), so --dtype bf16 computed in fp16. Such a load is
    stood in for here: from_pretrained hands back the model in the folder's fp16."""
    from diffusers.pipelines.kolors import ChatGLMModel

    from tadisr_core.prompt import _load_chatglm

    real = ChatGLMModel.from_pretrained.__func__

    def keeps_the_folders_dtype(cls, *args, torch_dtype=None, **kwargs):
        model, info = real(cls, *args, torch_dtype=torch.float16, **kwargs)
        return model, info

    monkeypatch.setattr(ChatGLMModel, "from_pretrained", classmethod(keeps_the_folders_dtype))
    encoder = _load_chatglm(tiny_dir["kolors"] / "text_encoder", torch.bfloat16)
    assert {t.dtype for t in encoder.parameters()} == {torch.bfloat16}


def test_a_text_encoder_of_fp16_variant_shards_makes_the_same_cache(tiny_dir, tmp_path):
    """Kwai-Kolors/Kolors-diffusers' text_encoder/ holds only model.fp16-0000N-of-0000M.safetensors and
    model.safetensors.index.fp16.json: read as that variant (it was "no file named model.safetensors")."""
    from diffusers.pipelines.kolors import ChatGLMModel

    model = ChatGLMModel.from_pretrained(tiny_dir["kolors"] / "text_encoder").half()
    folders = {}
    for variant in (None, "fp16"):
        folders[variant] = tmp_path / str(variant)
        shutil.copytree(tiny_dir["kolors"], folders[variant], ignore=shutil.ignore_patterns("text_encoder"))
        model.save_pretrained(folders[variant] / "text_encoder", variant=variant, max_shard_size="100KB")
    names = sorted(p.name for p in (folders["fp16"] / "text_encoder").iterdir())
    assert "model.safetensors.index.fp16.json" in names and not any(n.startswith("model.safetensors") for n in names
                                                                    if "index" not in n)
    assert sum(n.startswith("model.fp16-0000") for n in names) > 1
    plain, variant = (compute_prompt_cache_from_kolors(folders[v], **KW) for v in (None, "fp16"))
    assert torch.equal(variant.prompt_embeds, plain.prompt_embeds)
    assert torch.equal(variant.text_embeds, plain.text_embeds)


def test_a_file_without_the_rotary_buffer_takes_chatglm3s_head_width(tiny_dir, tmp_path):
    """The rotary buffer is what tells the head width; without it ChatGLM3's 128 is taken. A tiny
    model with 128-wide heads gives the same cache with and without the buffer."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    cfg = ChatGLMConfig(num_layers=2, hidden_size=128, ffn_hidden_size=64, kv_channels=128, num_attention_heads=1,
                        padded_vocab_size=256, multi_query_attention=True, multi_query_group_num=1,
                        add_qkv_bias=True, original_rope=True)
    model = ChatGLMModel(cfg, empty_init=False)
    g = torch.Generator().manual_seed(5)
    tensors = {k: (torch.ones(v.shape) if "norm" in k else torch.randn(v.shape, generator=g) * 0.05)
               for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    caches = []
    for name, extra in (("with", {"rotary_pos_emb.inv_freq": model.rotary_pos_emb.inv_freq}), ("without", {})):
        path = tmp_path / name / "chatglm3.safetensors"
        path.parent.mkdir()
        save_file({**tensors, **extra}, str(path))
        shutil.copytree(tiny_dir["kolors"] / "tokenizer", path.parent, dirs_exist_ok=True)
        caches.append(compute_prompt_cache_from_kolors(path, **KW))
    assert torch.equal(caches[0].prompt_embeds, caches[1].prompt_embeds)
    assert torch.equal(caches[0].text_embeds, caches[1].text_embeds)
    tiny = _single_file(tiny_dir, tmp_path / "tiny" / "chatglm3.safetensors",
                        lambda t: {k: v for k, v in t.items() if not k.endswith("inv_freq")})
    with pytest.raises(KolorsFolderError, match=r"do not fit heads 128 wide, and the file has no rotary_pos_emb"):
        chatglm_config(tiny)


def _architecture(cfg) -> dict:
    return {name: getattr(cfg, name) for name in (
        "num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
        "multi_query_attention", "multi_query_group_num", "add_qkv_bias", "add_bias_linear", "rmsnorm",
        "post_layer_norm", "layernorm_epsilon", "apply_residual_connection_post_layernorm",
        "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection", "original_rope")}


def test_the_full_size_structure_follows_from_the_shapes(tmp_path):
    """ChatGLM3-6B as Kolors configures it (text_encoder/config.json), built on the meta device: the
    config read back from its tensor shapes builds a model with the same tensors and the same sizes."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    kolors = ChatGLMConfig(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                           kv_channels=128, num_attention_heads=32, multi_query_attention=True,
                           multi_query_group_num=2, add_qkv_bias=True, add_bias_linear=False, seq_length=32768,
                           original_rope=True)
    with torch.device("meta"):
        full = ChatGLMModel(kolors, empty_init=False)
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes["encoder.layers.0.self_attention.query_key_value.weight"] == (4608, 4096)
    header = WeightsHeader(tmp_path / "chatglm3-fp16.safetensors",
                           {k: TensorInfo(torch.float16, s, 0, 0) for k, s in shapes.items()}, {})
    cfg = chatglm_config(header.path, header)
    assert _architecture(cfg) == _architecture(kolors)
    with torch.device("meta"):
        rebuilt = ChatGLMModel(cfg, empty_init=False)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    del header.tensors["rotary_pos_emb.inv_freq"]  # without the buffer: ChatGLM3's 128-wide heads
    assert _architecture(chatglm_config(header.path, header)) == _architecture(kolors)
    # diffusers 0.32-0.36 read config.use_cache in the forward pass (no attribute: the prompt cache of a
    # single file failed); the prompt is encoded once, so no key/value cache is kept
    assert cfg.use_cache is False


_QUANTIZED = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _quantized(tensors, bits):
    """ChatGLM's quantization as Kolors-MZ's 8- and 4-bit files hold it: each block's four linear weights
    as int8 (4-bit: two values a byte, here just half the columns) and `weight_scale` = row max / (2^(b-1)-1);
    with the fp16 weights the 8-bit file reads back as (int8 x scale, computed in fp16)."""
    quant, back = {}, {}
    for k, w in tensors.items():
        if k.startswith("encoder.layers.") and k.removesuffix(".weight").endswith(_QUANTIZED):
            w = w.half()
            scale = w.abs().amax(1) / (2 ** (bits - 1) - 1)
            q = torch.round(w / scale[:, None]).to(torch.int8)
            quant[k], quant[k + "_scale"] = (q if bits == 8 else q[:, ::2].contiguous()), scale
            back[k] = q.half() * scale[:, None]
        else:
            quant[k] = back[k] = w.half() if w.is_floating_point() and not k.endswith("inv_freq") else w
    return quant, back


def test_an_8bit_file_reads_back_as_its_dequantized_weights(tiny_dir, tmp_path, caplog):
    """Kolors-MZ's chatglm3-8bit.safetensors: its cache equals the one of a folder holding the weights
    it stands for (int8 x scale), with a warning that it is close to, not equal to, the fp16 one's."""
    quant, back = _quantized(_weights(tiny_dir), 8)
    llm = tmp_path / "LLM"
    eight = llm / "chatglm3-8bit.safetensors"
    llm.mkdir()
    save_file(quant, str(eight))
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", llm, dirs_exist_ok=True)
    folder = tmp_path / "kolors"
    shutil.copytree(tiny_dir["kolors"], folder)
    save_file(back, str(folder / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        cache = compute_prompt_cache_from_kolors(eight, **KW)
    assert "chatglm3-8bit.safetensors is an 8-bit ChatGLM3" in caplog.text
    ref = compute_prompt_cache_from_kolors(folder, **KW)
    assert torch.equal(cache.prompt_embeds, ref.prompt_embeds) and torch.equal(cache.text_embeds, ref.text_embeds)
    exact = compute_prompt_cache_from_kolors(tiny_dir["kolors"], **KW)
    assert not torch.equal(cache.prompt_embeds, exact.prompt_embeds)
    assert exact.note == "" and "8-bit ChatGLM3 chatglm3-8bit.safetensors" in cache.note
    cache.save(tmp_path / "cache.safetensors")  # the cache remembers, and says so whenever it is loaded
    caplog.clear()
    with caplog.at_level("WARNING"):
        loaded = PromptCache.load(tmp_path / "cache.safetensors")
    assert loaded.note == cache.note and "delete it to compute it again from Kolors' fp16 ChatGLM3" in caplog.text
    from tadisr_core.model import build_model
    from tadisr_core.spec import spec_for_size

    assert build_model(spec_for_size("tiny", "paper"), prompt=loaded).prompt.note == cache.note  # runs keep it
    _single_file(tiny_dir, llm / "chatglm3-fp16.safetensors")  # listed after the fp16 file, whatever the names
    assert list_text_encoders(llm) == [llm / "chatglm3-fp16.safetensors", eight]


def test_files_that_cannot_serve_are_named(tiny_dir, tmp_path):
    llm = tmp_path / "LLM"
    alone = _single_file(tiny_dir, llm / "chatglm3-fp16.safetensors")
    with pytest.raises(KolorsFolderError, match=r"chatglm3-fp16.safetensors is a ChatGLM3 weights file without its "
                                                r"tokenizer: put ChatGLM3's tokenizer.model"):
        find_text_encoder(alone)

    four_bit = _single_file(tiny_dir, llm / "chatglm3-4bit.safetensors", lambda t: _quantized(t, 4)[0])
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", llm, dirs_exist_ok=True)
    with pytest.raises(KolorsFolderError, match=r"chatglm3-4bit.safetensors is a 4-bit ChatGLM3.*use the fp16 file "
                                                r"\(chatglm3-fp16.safetensors\) or the 8-bit one"):
        compute_prompt_cache_from_kolors(four_bit, **KW)
    vae = tiny_dir["kolors"] / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(KolorsFolderError, match=r"diffusion_pytorch_model.safetensors is not a ChatGLM3 weights file"):
        compute_prompt_cache_from_kolors(vae, **KW)
    shard = tmp_path / "text_encoder" / "model-00001-of-00002.safetensors"  # one shard of a sharded folder
    shutil.copytree(tiny_dir["kolors"] / "text_encoder", shard.parent)
    (shard.parent / "model.safetensors").rename(shard)
    with pytest.raises(KolorsFolderError, match=r"model-00001-of-00002.safetensors is one shard of a ChatGLM3 "
                                                r"folder; pass the folder \(\S+text_encoder\)"):
        find_text_encoder(shard)
    torn = _single_file(tiny_dir, tmp_path / "torn" / "chatglm3-fp16.safetensors",
                        lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k})
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", torn.parent, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"chatglm3-fp16.safetensors: the weights do not fit the model: missing 2"):
        compute_prompt_cache_from_kolors(torn, **KW)
    partial = llm / "partial" / "chatglm3-fp16.safetensors"  # an interrupted download
    partial.parent.mkdir()
    partial.write_bytes(alone.read_bytes()[: alone.stat().st_size // 2])
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", partial.parent, dirs_exist_ok=True)
    with pytest.raises(KolorsFolderError, match=r"chatglm3-fp16.safetensors is truncated: .*download the ChatGLM3 "
                                                r"file again"):
        compute_prompt_cache_from_kolors(partial, **KW)
    problems = []
    assert list_text_encoders(partial.parent, problems=problems) == [] and "is truncated" in problems[0]

    def unscaled(tensors):  # int8 weights without their scales (another quantizer's layout, or damage)
        quant = _quantized(tensors, 8)[0]
        return {k: v for k, v in quant.items() if not k.endswith("_scale")}

    other = _single_file(tiny_dir, llm / "chatglm3-int8.safetensors", unscaled)
    with pytest.raises(KolorsFolderError, match=r"chatglm3-int8.safetensors: integer weights \(encoder.layers.0.\S+\) "
                                                r"of a layout that is not ChatGLM3's 8- or 4-bit one"):
        compute_prompt_cache_from_kolors(other, **KW)


def test_models_llm_lists_usable_files_and_says_why_others_are_not(tiny_dir, tmp_path):
    llm = tmp_path / "LLM"
    _single_file(tiny_dir, llm / "chatglm3-fp16.safetensors")
    shutil.copy(tiny_dir["kolors"] / "vae" / "diffusion_pytorch_model.safetensors", llm / "other.safetensors")
    _single_file(tiny_dir, llm / "chatglm3-4bit.safetensors", lambda t: _quantized(t, 4)[0])
    problems = []
    assert list_text_encoders(llm, problems=problems) == []
    assert len(problems) == 2 and "chatglm3-4bit.safetensors is a 4-bit ChatGLM3" in problems[0]
    assert "chatglm3-fp16.safetensors is a ChatGLM3 weights file without its tokenizer" in problems[1]
    (llm / "chatglm3-4bit.safetensors").unlink()
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", llm / "tokenizer")
    folder = llm / "chatglm3-6b"
    shutil.copytree(tiny_dir["kolors"] / "text_encoder", folder)
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", folder, dirs_exist_ok=True)
    problems = []
    assert list_text_encoders(llm, problems=problems) == [folder, llm / "chatglm3-fp16.safetensors"]
    assert problems == []


def test_a_chatglm_other_than_kolors_base_is_listed_last_and_its_cache_says_so(tiny_dir, tmp_path, caplog):
    """Kolors' text encoder is ChatGLM3-6B-Base (its text_encoder/config.json names THUDM/chatglm3-6b-base);
    the chat model THUDM/chatglm3-6b, which LLM node packs keep in models/LLM, has the same shapes and other
    weights. It was the node's automatic source whenever its name sorted first; now it is listed after
    Kolors' own, and a cache computed from it warns, and says so whenever it is loaded."""
    llm = tmp_path / "LLM"
    folders = {}
    for name, source in (("chatglm3-6b", "THUDM/chatglm3-6b"), ("chatglm3-6b-base", "THUDM/chatglm3-6b-base"),
                         ("text_encoder", "/home/me/Kolors/text_encoder")):
        folder = folders[source] = llm / name
        shutil.copytree(tiny_dir["kolors"] / "text_encoder", folder)
        shutil.copytree(tiny_dir["kolors"] / "tokenizer", folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": source}))
    single = _single_file(tiny_dir, llm / "chatglm3-fp16.safetensors")
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", llm, dirs_exist_ok=True)
    chat = folders["THUDM/chatglm3-6b"]
    assert list_text_encoders(llm) == [folders["THUDM/chatglm3-6b-base"], single,
                                       folders["/home/me/Kolors/text_encoder"], chat]
    with caplog.at_level("WARNING"):
        kolors = compute_prompt_cache_from_kolors(folders["THUDM/chatglm3-6b-base"], **KW)
        assert kolors.note == "" and caplog.text == ""
        cache = compute_prompt_cache_from_kolors(chat, **KW)
    assert (f"{chat} is THUDM/chatglm3-6b (its config.json says so), not Kolors' text encoder, ChatGLM3-6B-Base "
            f"(THUDM/chatglm3-6b-base)") in caplog.text
    assert cache.note == f"computed from THUDM/chatglm3-6b ({chat}), not Kolors' ChatGLM3-6B-Base"
    cache.save(tmp_path / "cache.safetensors")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert PromptCache.load(tmp_path / "cache.safetensors").note == cache.note
    assert "not Kolors' ChatGLM3-6B-Base; delete it to compute it again from Kolors' fp16 ChatGLM3" in caplog.text


def test_other_language_models_in_models_llm_are_not_taken_for_chatglm3(tiny_dir, tmp_path):
    """models/LLM also holds Llama, Mistral...: config.json and tokenizer.model, but another model_type.
    They are left out of the list (an upper-case name sorted first and became the node's automatic
    source), and passing one says what it is."""
    llm = tmp_path / "LLM"
    chatglm = llm / "chatglm3-6b"
    shutil.copytree(tiny_dir["kolors"] / "text_encoder", chatglm)
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", chatglm, dirs_exist_ok=True)
    mistral = llm / "Mistral-7B-Instruct-v0.2"
    mistral.mkdir()
    (mistral / "config.json").write_text('{"model_type": "mistral", "architectures": ["MistralForCausalLM"]}')
    shutil.copy(tiny_dir["kolors"] / "tokenizer" / "tokenizer.model", mistral)
    assert list_text_encoders(llm) == [chatglm]
    with pytest.raises(KolorsFolderError, match=r"Mistral-7B-Instruct-v0.2 is not ChatGLM3 \(its config.json says "
                                                r"model_type 'mistral', not 'chatglm'\)"):
        compute_prompt_cache_from_kolors(mistral, **KW)


class _ChatGLM3Pieces:
    """The pieces and ids ChatGLM3's own tokenizer (Kolors' tokenizer.model) gives these prompts,
    recorded from it: after a comma the word is 'text' (id 1648), alone or after a space '▁text'
    (id 2254). Left padding with 0, then [gMASK] sop (64790, 64792), as ChatGLMTokenizer pads."""

    PIECES = {
        "best quality,highres,extremely detailed,text": (
            ["▁best", "▁quality", ",", "high", "res", ",", "ext", "rem", "ely", "▁detailed", ",", "text"],
            [1077, 2145, 30932, 9371, 414, 30932, 3406, 1372, 620, 6374, 30932, 1648]),
        "text on a sign, best quality": (["▁text", "▁on", "▁a", "▁sign", ",", "▁best", "▁quality"],
                                         [2254, 331, 260, 1117, 30932, 1077, 2145]),
        "a sign with Text": (["▁a", "▁sign", "▁with", "▁Text"], [260, 1117, 356, 8484]),
        "text": (["▁text"], [2254]),
    }

    def tokenize(self, text):
        return list(self.PIECES[text][0])

    def __call__(self, text, padding, max_length, truncation):
        ids = ([64790, 64792] + self.PIECES[text][1])[:max_length]  # truncation keeps the start
        return {"input_ids": [0] * (max_length - len(ids)) + ids}


def test_the_word_text_is_found_in_chatglm3s_own_pieces():
    """The release prompt ends in 'text' without the word-start mark that "text" alone carries; the
    column is the last one either way (255 of Kolors' 256), and the mark and case never hide the word."""
    from tadisr_core.prompt import find_word_columns
    from tadisr_core.spec import HEATMAP_PROMPT

    tok = _ChatGLM3Pieces()
    assert find_word_columns(tok, HEATMAP_PROMPT, "text", 256) == (255,)
    assert find_word_columns(tok, HEATMAP_PROMPT, "text", 32) == (31,)
    assert find_word_columns(tok, "text on a sign, best quality", "text", 256) == (249,)
    assert find_word_columns(tok, "a sign with Text", "text", 256) == (255,)
    with pytest.raises(ValueError, match="prompt of 12 tokens does not fit 13"):
        find_word_columns(tok, HEATMAP_PROMPT, "text", 13)


def test_the_node_packs_tokenizer_is_chatglms_kolors_mz_and_kwaikolorswrapper_first(tiny_dir, tmp_path):
    """In custom_nodes, a pack's configs/tokenizer counts only when its tokenizer_config.json names
    ChatGLMTokenizer, and the two Kolors packs come first; models kept outside the ComfyUI tree
    (extra_model_paths.yaml) find it under a root given by the nodes."""
    from tadisr_core import chatglm_file

    comfy = tmp_path / "ComfyUI"
    weights = _single_file(tiny_dir, comfy / "models" / "LLM" / "checkpoints" / "chatglm3-fp16.safetensors")
    nodes = comfy / "custom_nodes"
    for pack in ("A-other-llm", "B-another-chatglm", "ComfyUI-KwaiKolorsWrapper"):
        shutil.copytree(tiny_dir["kolors"] / "tokenizer", nodes / pack / "configs" / "tokenizer")
    other = nodes / "A-other-llm" / "configs" / "tokenizer" / "tokenizer_config.json"
    other.write_text(other.read_text().replace("ChatGLMTokenizer", "LlamaTokenizer"))
    assert find_tokenizer(weights) == nodes / "ComfyUI-KwaiKolorsWrapper" / "configs" / "tokenizer"
    shutil.rmtree(nodes / "ComfyUI-KwaiKolorsWrapper")
    assert find_tokenizer(weights) == nodes / "B-another-chatglm" / "configs" / "tokenizer"

    elsewhere = _single_file(tiny_dir, tmp_path / "models-on-a-nas" / "LLM" / "chatglm3-fp16.safetensors")
    with pytest.raises(KolorsFolderError, match=r"without its tokenizer: .*\(looked in \S+LLM, \S+LLM/tokenizer\)"):
        find_tokenizer(elsewhere)
    roots = list(chatglm_file._TOKENIZER_ROOTS)
    try:
        chatglm_file.add_tokenizer_root(comfy)
        assert find_tokenizer(elsewhere) == nodes / "B-another-chatglm" / "configs" / "tokenizer"
    finally:
        chatglm_file._TOKENIZER_ROOTS[:] = roots


def test_a_text_encoder_without_its_shards_is_named_not_loaded(tiny_dir, tmp_path, capsys):
    """Defect: a text_encoder/ holding only its config and shard index counted as ChatGLM3; computing the
    prompt cache ended in a raw FileNotFoundError of a shard ([Errno 2] on the command line)."""
    from tadisr_core import cli

    kolors = json_only_text_encoder(tiny_dir, tmp_path / "Kolors")
    with pytest.raises(KolorsFolderError, match=r"^\S+Kolors/text_encoder lacks pytorch_model-00001-of-00007.bin "
                                                r"and 6 more of the ChatGLM3 weights listed in "
                                                r"pytorch_model.bin.index.json: download them into text_encoder/"):
        find_text_encoder(kolors)
    assert list_text_encoders(tmp_path) == []
    code = cli.main(["prompt-cache", "--kolors", str(kolors), "-o", str(tmp_path / "cache.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_SETUP and len(err.splitlines()) == 1 and "Errno" not in err
    assert "text_encoder lacks pytorch_model-00001-of-00007.bin and 6 more" in err
    for i in range(1, 8):  # the shards downloaded: whole again (what they hold is from_pretrained's to read)
        (kolors / "text_encoder" / f"pytorch_model-0000{i}-of-00007.bin").write_bytes(b"")
    assert find_text_encoder(kolors) == (kolors / "text_encoder", kolors / "tokenizer")
    (kolors / "text_encoder" / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(KolorsFolderError, match=r"text_encoder holds no ChatGLM3 weights \(model.safetensors, "
                                                r"pytorch_model.bin or the shards of their \*.index.json\)"):
        find_text_encoder(kolors)


def test_chatglm3_in_sub_folders_of_models_llm_is_found_as_comfyui_lists_it(tiny_dir, tmp_path):
    """Defect: models/LLM/chatglm3/chatglm3-fp16.safetensors (Kolors-MZ's loader lists sub-folders, as
    ComfyUI does) was not found: only the top level was read. Top-level entries still come first, 8-bit
    files last, and a model folder's own files (the shards of a ChatGLM3 folder) are not read as files."""
    llm = tmp_path / "LLM"
    nested = _single_file(tiny_dir, llm / "chatglm3" / "chatglm3-fp16.safetensors")
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", nested.parent, dirs_exist_ok=True)
    eight = _single_file(tiny_dir, llm / "a" / "chatglm3-8bit.safetensors", lambda t: _quantized(t, 8)[0])
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", eight.parent, dirs_exist_ok=True)
    deeper = _single_file(tiny_dir, llm / "b" / "c" / "chatglm3.safetensors")
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", deeper.parent, dirs_exist_ok=True)
    (llm / "b" / "c" / "chatglm3.bin").write_bytes(deeper.read_bytes())  # below the top: read by name, as listed
    top = _single_file(tiny_dir, llm / "z-chatglm3-fp16.safetensors")
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", llm, dirs_exist_ok=True)
    sharded = llm / "chatglm3-6b"  # a ChatGLM3 folder whose weights are one shard (its own file, not a source)
    shutil.copytree(tiny_dir["kolors"] / "text_encoder", sharded)
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", sharded, dirs_exist_ok=True)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"embedding.word_embeddings.weight": "model-00001-of-00001.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = []
    assert list_text_encoders(llm, llm / "b", problems=problems) == [sharded, top, nested, deeper, eight]
    assert problems == []


def test_a_chatglm3_folder_missing_its_weights_is_named_and_a_file_beside_a_config_is_found(tiny_dir, tmp_path):
    """Defects (review): a ChatGLM3 folder in models/LLM without its shards was passed over without a word (the
    error then asked for what the user has), and chatglm3-fp16.safetensors kept beside chatglm3-6b's config.json
    (Kolors-MZ lists it) was not found: the folder counted as a model folder whose files are its parts."""
    llm = tmp_path / "LLM"
    partial = llm / "chatglm3-6b"
    shutil.copytree(tiny_dir["kolors"] / "text_encoder", partial)
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", partial, dirs_exist_ok=True)
    (partial / "model.safetensors").unlink()
    index = {"weight_map": {"embedding.word_embeddings.weight": "model-00001-of-00002.safetensors",
                            "encoder.final_layernorm.weight": "model-00002-of-00002.safetensors"}}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = []
    assert list_text_encoders(llm, problems=problems) == []
    assert problems == [f"{partial} lacks model-00001-of-00002.safetensors and 1 more of the ChatGLM3 weights listed "
                        "in model.safetensors.index.json: download them into chatglm3-6b/ (Kwai-Kolors/Kolors), or use "
                        "another ChatGLM3 (chatglm3-fp16.safetensors) or a precomputed prompt cache"]
    single = _single_file(tiny_dir, llm / "chatglm3" / "chatglm3-fp16.safetensors")
    shutil.copytree(tiny_dir["kolors"] / "tokenizer", single.parent, dirs_exist_ok=True)
    shutil.copy(partial / "config.json", single.parent / "config.json")
    assert list_text_encoders(llm) == [single]
