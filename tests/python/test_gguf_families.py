"""kiln convert of GGUF files of the non-Llama families against transformers.

Each tiny model (hidden 64, 2-6 layers) is made by transformers' own class with random weights; the test writes it as
GGUF with the `gguf` package's GGUFWriter the way llama.cpp's convert_hf_to_gguf.py stores that family (its tensor
names and {arch}.* keys; Gemma's norm weights stored as 1 + w; Phi-3's fused qkv / gate_up; GPT-2's Conv1D weights
transposed and its embedding copied to output.weight; q/k rows interleaved for the "normal"-RoPE families Llama,
Mixtral and InternLM2; experts stacked in one [experts, rows, cols] tensor). kiln's logits from the converted
workspace must equal transformers' logits of the original model within 1e-3 (fp32), and, where transformers can load
that GGUF architecture itself (`from_pretrained(gguf_file=)`), those logits too.
"""
import json

import numpy as np
import pytest
import torch

from conftest import run_kiln

gguf = pytest.importorskip("gguf")
import gguf_fixtures as fx  # noqa: E402

TOKENS, TOKEN_TYPES, MERGES = fx.tokenizer_metadata()
VOCAB = len(TOKENS)
IDS = [256, 10, 77, 3, 258, 200, 41, 99, 257, 12, 5, 180]
TOL = 1e-3
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.08)


def np32(t):
    return t.detach().float().contiguous().numpy()


def permute(w, heads):
    return fx.llama_permute(w, heads)


class Writer:
    """GGUFWriter with llama.cpp's common {arch}.* keys and the fixture tokenizer."""

    def __init__(self, path, arch, cfg, ffn=None):
        self.w = gguf.GGUFWriter(str(path), arch)
        w = self.w
        w.add_name(f"tiny-{arch}")
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(ffn or cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(TOKENS)
        w.add_token_types(TOKEN_TYPES)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(VOCAB - 2)
        w.add_eos_token_id(VOCAB - 1)
        w.add_pad_token_id(VOCAB - 1)

    drop = ()  # tensor names left out (the refusal test)

    def add(self, name, t):
        if name in self.drop:
            return
        self.w.add_tensor(name, np32(t) if isinstance(t, torch.Tensor) else t)

    def close(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def write_llama_layout(wr, sd, cfg, i, permuted, norms=("attn_norm", "ffn_norm"), shift=0.0):
    """Attention of the Llama layout: q/k/v (+ biases, q/k norms) and the pre-norms, in llama.cpp's names."""
    p = f"model.layers.{i}."
    a = p + "self_attn."
    for x in "qkv":
        w = sd[a + f"{x}_proj.weight"]
        heads = cfg.num_attention_heads if x == "q" else cfg.num_key_value_heads
        wr.add(f"blk.{i}.attn_{x}.weight", permute(w, heads) if permuted and x != "v" else w)
        if a + f"{x}_proj.bias" in sd:
            b = sd[a + f"{x}_proj.bias"]
            wr.add(f"blk.{i}.attn_{x}.bias", permute(b, heads) if permuted and x != "v" else b)
    if a + "q_norm.weight" in sd:
        wr.add(f"blk.{i}.attn_q_norm.weight", sd[a + "q_norm.weight"] + shift)
        wr.add(f"blk.{i}.attn_k_norm.weight", sd[a + "k_norm.weight"] + shift)
    wr.add(f"blk.{i}.attn_output.weight", sd[a + "o_proj.weight"])
    wr.add(f"blk.{i}.{norms[0]}.weight", sd[p + "input_layernorm.weight"] + shift)
    wr.add(f"blk.{i}.{norms[1]}.weight", sd[p + "post_attention_layernorm.weight"] + shift)


def write_dense_mlp(wr, sd, i):
    m = f"model.layers.{i}.mlp."
    for x in ("gate", "up", "down"):
        wr.add(f"blk.{i}.ffn_{x}.weight", sd[m + f"{x}_proj.weight"])


def write_experts(wr, sd, i):
    m = f"model.layers.{i}.mlp."
    wr.add(f"blk.{i}.ffn_gate_inp.weight", sd[m + "gate.weight"])
    gate, up = sd[m + "experts.gate_up_proj"].chunk(2, dim=1)  # [experts, 2 * I, hidden], gate first
    wr.add(f"blk.{i}.ffn_gate_exps.weight", gate)
    wr.add(f"blk.{i}.ffn_up_exps.weight", up)
    wr.add(f"blk.{i}.ffn_down_exps.weight", sd[m + "experts.down_proj"])
    if m + "shared_expert_gate.weight" in sd:
        # [1, hidden] in HF; llama.cpp's files hold it as a vector (transformers' GGUF loader unsqueezes it again)
        wr.add(f"blk.{i}.ffn_gate_inp_shexp.weight", sd[m + "shared_expert_gate.weight"][0])
        for x in ("gate", "up", "down"):
            wr.add(f"blk.{i}.ffn_{x}_shexp.weight", sd[m + f"shared_expert.{x}_proj.weight"])


def write_ends(wr, sd, cfg, shift=0.0):
    wr.add("token_embd.weight", sd["model.embed_tokens.weight"])
    wr.add("output_norm.weight", sd["model.norm.weight"] + shift)
    if not cfg.tie_word_embeddings:
        wr.add("output.weight", sd["lm_head.weight"])


def gguf_llama(path, model, arch="llama"):
    """Llama, Mixtral (experts) and InternLM2 (whose GGUF is the Llama layout): q/k interleaved."""
    cfg, sd = model.config, model.state_dict()
    wr = Writer(path, arch, cfg)
    wr.w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    wr.w.add_rope_dimension_count(cfg.head_dim)
    if getattr(cfg, "num_local_experts", None):
        wr.w.add_expert_count(cfg.num_local_experts)
        wr.w.add_expert_used_count(cfg.num_experts_per_tok)
    write_ends(wr, sd, cfg)
    for i in range(cfg.num_hidden_layers):
        write_llama_layout(wr, sd, cfg, i, permuted=True)
        (write_experts if getattr(cfg, "num_local_experts", None) else write_dense_mlp)(wr, sd, i)
    wr.close()


def gguf_qwen_moe(path, model, arch):
    cfg, sd = model.config, model.state_dict()
    wr = Writer(path, arch, cfg)
    wr.w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    wr.w.add_key_length(cfg.head_dim)
    wr.w.add_value_length(cfg.head_dim)
    wr.w.add_expert_count(cfg.num_experts)
    wr.w.add_expert_used_count(cfg.num_experts_per_tok)
    wr.w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        wr.w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    write_ends(wr, sd, cfg)
    for i in range(cfg.num_hidden_layers):
        write_llama_layout(wr, sd, cfg, i, permuted=False)
        write_experts(wr, sd, i)
    wr.close()


def gguf_gemma(path, model, arch):
    """Gemma 1/2/3: every norm weight stored as 1 + w (llama.cpp's converter adds the 1 that HF's norm applies)."""
    cfg, sd = model.config, model.state_dict()
    wr = Writer(path, arch, cfg)
    wr.w.add_key_length(cfg.head_dim)
    wr.w.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        wr.w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    if arch != "gemma":
        wr.w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        wr.w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        wr.w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    write_ends(wr, sd, cfg, shift=1.0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if arch == "gemma":
            write_llama_layout(wr, sd, cfg, i, permuted=False, shift=1.0)
        else:
            write_llama_layout(wr, sd, cfg, i, permuted=False, norms=("attn_norm", "post_attention_norm"), shift=1.0)
            wr.add(f"blk.{i}.ffn_norm.weight", sd[p + "pre_feedforward_layernorm.weight"] + 1.0)
            wr.add(f"blk.{i}.post_ffw_norm.weight", sd[p + "post_feedforward_layernorm.weight"] + 1.0)
        write_dense_mlp(wr, sd, i)
    wr.close()


def gguf_phi3(path, model, arch="phi3"):
    """Phi-3: qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up of 2 * feed_forward_length rows)."""
    cfg, sd = model.config, model.state_dict()
    wr = Writer(path, arch, cfg)
    wr.w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    wr.w.add_rope_dimension_count(cfg.head_dim)  # Phi-3 rotates whole heads
    write_ends(wr, sd, cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        wr.add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        wr.add(f"blk.{i}.attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
        wr.add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        wr.add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        wr.add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        wr.add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    wr.close()


def gguf_gpt2(path, model, arch="gpt2"):
    """GPT-2: Conv1D weights ([in, out]) transposed; the embedding written again as output.weight."""
    cfg, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    wr = Writer.__new__(Writer)
    wr.w = w
    t = "transformer."
    wr.add("token_embd.weight", sd[t + "wte.weight"])
    wr.add("position_embd.weight", sd[t + "wpe.weight"])
    wr.add("output_norm.weight", sd[t + "ln_f.weight"])
    wr.add("output_norm.bias", sd[t + "ln_f.bias"])
    wr.add("output.weight", sd[t + "wte.weight"])
    for i in range(cfg.n_layer):
        h = f"{t}h.{i}."
        for name, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            wr.add(f"blk.{i}.{name}.weight", sd[h + hf + ".weight"])
            wr.add(f"blk.{i}.{name}.bias", sd[h + hf + ".bias"])
        for name, hf in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
                         ("ffn_down", "mlp.c_proj")):
            wr.add(f"blk.{i}.{name}.weight", sd[h + hf + ".weight"].t())
            wr.add(f"blk.{i}.{name}.bias", sd[h + hf + ".bias"])
    wr.close()


def gguf_glm(path, model, arch):
    """GLM-4 (chatglm: q/k/v fused in attn_qkv, or left separate for the "-split" variant) and GLM-4-0414 (glm4:
    separate q/k/v, post-norms); gate_up_proj stays fused in ffn_up; RoPE on interleaved pairs needs no permutation."""
    cfg, sd = model.config, model.state_dict()
    split = arch.endswith("-split")
    arch = arch.removesuffix("-split")
    wr = Writer(path, arch, cfg)
    wr.w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    wr.w.add_rope_dimension_count(int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    write_ends(wr, sd, cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if arch == "chatglm" and not split:
            wr.add(f"blk.{i}.attn_qkv.weight", torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"]))
            wr.add(f"blk.{i}.attn_qkv.bias", torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"]))
        else:
            for x in "qkv":
                wr.add(f"blk.{i}.attn_{x}.weight", sd[a + f"{x}_proj.weight"])
                wr.add(f"blk.{i}.attn_{x}.bias", sd[a + f"{x}_proj.bias"])
        wr.add(f"blk.{i}.attn_output.weight", sd[a + "o_proj.weight"])
        wr.add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        wr.add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        if arch == "glm4":
            wr.add(f"blk.{i}.post_attention_norm.weight", sd[p + "post_self_attn_layernorm.weight"])
            wr.add(f"blk.{i}.post_ffw_norm.weight", sd[p + "post_mlp_layernorm.weight"])
        wr.add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        wr.add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    wr.close()


def make_model(name):
    import transformers as tr
    moe = dict(num_experts_per_tok=2)
    specs = {
        # name: (GGUF architecture, model class, config class, config keys, GGUF writer, transformers reads it)
        "gemma": ("gemma", tr.GemmaForCausalLM, tr.GemmaConfig, dict(hidden_activation="gelu_pytorch_tanh"),
                  gguf_gemma, False),
        "gemma2": ("gemma2", tr.Gemma2ForCausalLM, tr.Gemma2Config,
                   dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4), gguf_gemma, True),
        "gemma3": ("gemma3", tr.Gemma3ForCausalLM, tr.Gemma3TextConfig,
                   dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4, num_hidden_layers=6), gguf_gemma,
                   True),
        "phi3": ("phi3", tr.Phi3ForCausalLM, tr.Phi3Config, dict(sliding_window=None, pad_token_id=VOCAB - 1),
                 gguf_phi3, True),
        "gpt2": ("gpt2", tr.GPT2LMHeadModel, tr.GPT2Config,
                 dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024), gguf_gpt2, True),
        "mixtral": ("llama", tr.MixtralForCausalLM, tr.MixtralConfig, dict(num_local_experts=4, **moe), gguf_llama,
                    False),
        "qwen2moe": ("qwen2moe", tr.Qwen2MoeForCausalLM, tr.Qwen2MoeConfig,
                     dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=4, **moe),
                     gguf_qwen_moe, True),
        "qwen3moe": ("qwen3moe", tr.Qwen3MoeForCausalLM, tr.Qwen3MoeConfig,
                     dict(moe_intermediate_size=768, num_experts=4, norm_topk_prob=True, **moe), gguf_qwen_moe, True),
        # InternLM2's block is Llama's and llama.cpp's converter splits its wqkv into Llama's q/k/v: a LlamaForCausalLM
        # is its oracle.
        "internlm2": ("internlm2", tr.LlamaForCausalLM, tr.LlamaConfig, dict(tie_word_embeddings=False), gguf_llama,
                      False),
        "chatglm": ("chatglm", tr.GlmForCausalLM, tr.GlmConfig, dict(pad_token_id=VOCAB - 1), gguf_glm, False),
        "chatglm-split": ("chatglm-split", tr.GlmForCausalLM, tr.GlmConfig, dict(pad_token_id=VOCAB - 1), gguf_glm,
                          False),
        "glm4": ("glm4", tr.Glm4ForCausalLM, tr.Glm4Config, dict(pad_token_id=VOCAB - 1), gguf_glm, False),
    }
    arch, model_cls, cfg_cls, extra, writer, hf_reads_gguf = specs[name]
    keys = dict(extra) if name == "gpt2" else {**COMMON, **extra}
    torch.manual_seed(sum(map(ord, name)))
    model = model_cls(cfg_cls(**keys)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)  # norms away from their init, so their mapping matters
            if n.endswith("mlp.gate.weight"):
                p.mul_(8.0)  # decisive routing
    return arch, model, writer, hf_reads_gguf


def kiln_logits(ws, tmp_path, ids):
    from safetensors.numpy import load_file
    tok = tmp_path / "ids.json"
    tok.write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", ws, "--tokens", tok, "--ctx", len(ids), "--kv-cache", "fp32", "--save-logits", out)
    return load_file(str(out))["logits"]


FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "gpt2", "mixtral", "qwen2moe", "qwen3moe", "internlm2", "chatglm",
            "chatglm-split", "glm4"]


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf_family_import_and_export(name, tmp_path):
    """Import: kiln's logits on the converted file equal transformers' on the original model (and on the same file,
    where transformers reads that GGUF architecture). Export: kiln export --format gguf of the workspace has the same
    tensor names, shapes and types as the file written here the way llama.cpp's converter does; kiln convert of it
    gives the workspace back exactly; transformers' GGUF loader, where it reads the architecture, gives the original
    model's logits on it."""
    arch, model, writer, hf_reads_gguf = make_model(name)
    src = tmp_path / f"tiny-{name}.gguf"
    writer(src, model, arch)
    ws, back, exported = tmp_path / "ws", tmp_path / "back", tmp_path / "out" / f"tiny-{name}.gguf"
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    spec = lambda w: json.loads((w / "kiln.json").read_text())["model"]
    got = kiln_logits(ws, tmp_path, IDS)
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0].numpy()
    diff = float(np.abs(got - want).max())
    print(f"{name} ({spec(ws)['family']}): max |logit diff| vs transformers {diff:.2e}")
    assert diff <= TOL

    def transformers_gguf_logits(path):
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            return ref(torch.tensor([IDS])).logits[0].numpy()

    if hf_reads_gguf:
        diff = float(np.abs(got - transformers_gguf_logits(src)).max())
        print(f"{name}: max |logit diff| vs transformers' GGUF loader {diff:.2e}")
        assert diff <= TOL

    exported.parent.mkdir()
    run_kiln("export", ws, "--format", "gguf", "-o", exported)
    layout = lambda path: {t.name: (t.tensor_type.name, [int(d) for d in t.shape])
                           for t in gguf.GGUFReader(str(path)).tensors}
    if not arch.endswith("-split"):  # kiln writes the fused layout
        assert layout(exported) == layout(src)
    meta = gguf.GGUFReader(str(exported)).fields
    assert meta["general.architecture"].contents() == arch.removesuffix("-split")
    run_kiln("convert", exported, "-o", back, "--dtype", "fp32")
    from safetensors.numpy import load_file
    a = {k: v for f in sorted(ws.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted(back.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert spec(ws) == spec(back)
    if hf_reads_gguf:
        diff = float(np.abs(transformers_gguf_logits(exported) - want).max())
        print(f"{name}: transformers on kiln's export vs the original model: {diff:.2e}")
        assert diff <= TOL


def test_inconsistent_family_files_are_refused_in_one_line(tmp_path, monkeypatch):
    # A Gemma 2 file without a post-norm; a Mixtral file whose expert_count disagrees with its stacked experts.
    cases = [("gemma2", lambda: monkeypatch.setattr(Writer, "drop", ("blk.1.post_ffw_norm.weight",)),
              "'blk.1.post_ffw_norm.weight' is missing"),
             ("mixtral", lambda: monkeypatch.setattr(gguf.GGUFWriter, "add_expert_count",
                                                     lambda self, n: self.add_uint32("llama.expert_count", n + 1)),
              "'blk.0.ffn_gate_inp.weight' has shape [4, 64]; the metadata implies [5, 64]")]
    for name, patch, message in cases:
        arch, model, writer, _ = make_model(name)
        with monkeypatch.context():
            patch()
            writer(tmp_path / f"{name}.gguf", model, arch)
        p = run_kiln("convert", tmp_path / f"{name}.gguf", "-o", tmp_path / "out", check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr and f"{name}.gguf" in p.stderr, p.stderr
        assert not (tmp_path / "out").exists()
