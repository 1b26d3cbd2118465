"""`diffutext import-diffuseq` against an independent reference: DiffuSeq's TransformerNetModel rebuilt here from
Hugging Face `transformers`' BertEncoder (a test-only dependency) under DiffuSeq's module names, its state dict
saved as DiffuSeq saves one (torch.save of the state dict, beside a training_args.json and its vocab.json)."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

from diffutext.evaluate import load_model
from diffutext.samplers import generate, make_sampler
from helpers import Evil, assert_one_line_error, invoke

T, HIDDEN, TIME, SEQ = 200, 16, 16, 32


def sinusoid(t, dim):
    """Sinusoidal features [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/(dim/2)), as DiffuSeq's timestep_embedding."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Reference(nn.Module):
    """DiffuSeq's TransformerNetModel (init_pretrained 'no'), with its module names; `forward` takes the timesteps
    as DiffuSeq's respacing wrapper hands them over, already rescaled to t·1000/T."""

    def __init__(self, vocab_size, config: BertConfig):
        super().__init__()
        W = config.hidden_size
        self.word_embedding = nn.Embedding(vocab_size, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, vocab_size)
        self.lm_head.weight = self.word_embedding.weight
        self.time_embed = nn.Sequential(nn.Linear(TIME, 4 * TIME), nn.SiLU(), nn.Linear(4 * TIME, W))
        self.input_up_proj = nn.Sequential(nn.Linear(HIDDEN, W), nn.Tanh(), nn.Linear(W, W))
        self.input_transformers = BertEncoder(config)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, W)
        self.LayerNorm = nn.LayerNorm(W, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.output_down_proj = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, HIDDEN))

    def forward(self, x, timesteps):
        L = x.shape[1]
        h = self.position_embeddings(self.position_ids[:, :L]) + self.input_up_proj(x) + self.time_embed(sinusoid(timesteps, TIME))[:, None]
        h = self.input_transformers(self.dropout(self.LayerNorm(h))).last_hidden_state
        return self.output_down_proj(h)


class Adapter(nn.Module):
    """The reference behind diffutext's sampling interface: integer t, rescaled as DiffuSeq's wrapper does."""

    def __init__(self, ref):
        super().__init__()
        self.ref, self.embedding = ref, ref.word_embedding

    def embed(self, ids):
        return self.ref.word_embedding(ids)

    def logits(self, x):
        return self.ref.lm_head(x)

    def forward(self, z, t):
        return self.ref(z, t.float() * (1000.0 / T))


@pytest.fixture(scope="module")
def diffuseq_folder(tmp_path_factory, small_task):
    """A DiffuSeq model folder: training_args.json, vocab.json (its own vocabulary), ema_0.9999_000100.pt whose
    lm_head.weight is the raw model's and word_embedding.weight the EMA's, as DiffuSeq's EMA files are."""
    root = tmp_path_factory.mktemp("diffuseq")
    words = sorted(
        {w for line in (small_task / "train.jsonl").read_text().splitlines() for side in json.loads(line).values() for w in side.split()}
    )
    vocab = {"[START]": 0, "[END]": 1, "[UNK]": 2, "[PAD]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    bert = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
    )
    bert.save_pretrained(root / "bert-config")  # config_name: a local config folder, as DiffuSeq's --config_name takes
    torch.manual_seed(0)
    ref = Reference(len(vocab), bert)
    with torch.no_grad():
        for p in ref.parameters():  # a trained-looking model: no zero biases, no unit LayerNorms
            p.add_(0.1 * torch.randn_like(p))
    folder = root / "diffuseq_bible_h16"
    folder.mkdir()
    state = ref.state_dict()
    state["word_embedding.weight"] = state["word_embedding.weight"] + 0.05 * torch.randn_like(state["word_embedding.weight"])  # EMA
    torch.save(state, folder / "ema_0.9999_000100.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "training_args.json").write_text(
        json.dumps(
            {
                "hidden_dim": HIDDEN,
                "hidden_t_dim": TIME,
                "seq_len": SEQ,
                "diffusion_steps": T,
                "noise_schedule": "sqrt",
                "dropout": 0.1,
                "vocab": str(root / "vocab.txt"),
                "config_name": str(root / "bert-config"),
                "data_dir": str(small_task),
                "dataset": "bible",
                "schedule_sampler": "lossaware",
                "predict_xstart": True,
                "rescale_timesteps": True,
                "learn_sigma": False,
                "lr": 1e-4,
                "ema_rate": "0.9999",
                "seed": 102,
                "learning_steps": 100,
                "gradient_clipping": -1.0,
                "use_plm_init": "no",
            }
        )
    )
    # what DiffuSeq's sampling does: load the file; lm_head.weight (the raw model's) comes last into the tied parameter
    ref.load_state_dict(torch.load(folder / "ema_0.9999_000100.pt", weights_only=True))
    assert torch.equal(ref.word_embedding.weight, torch.load(folder / "ema_0.9999_000100.pt")["lm_head.weight"])
    return folder, ref.eval(), vocab


def test_import_gives_diffuseqs_network(diffuseq_folder, tmp_path):
    folder, ref, vocab = diffuseq_folder
    result = invoke("import-diffuseq", folder, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "lm_head.weight differs" in " ".join(result.output.split())
    loaded = load_model(tmp_path / "run")
    cfg = loaded.checkpoint.config
    assert (cfg.model.arch, cfg.model.layout, cfg.model.heads, cfg.model.layers, cfg.model.width, loaded.checkpoint.step) == (
        "diffuseq",
        "diffuseq",
        2,
        2,
        32,
        100,
    )
    assert cfg.diffusion.T == T and cfg.diffusion.timestep_sampler == "lossaware" and cfg.model.vocab_size == len(vocab)
    assert torch.equal(loaded.model.embedding.weight, ref.word_embedding.weight)  # the tied weight DiffuSeq samples with
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(3, SEQ, HIDDEN, generator=g), torch.tensor([0, 57, 199])
    with torch.no_grad():
        ours, theirs = loaded.model(z, t), ref(z, t.float() * 1000 / T)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(loaded.model.logits(z), ref.lm_head(z), atol=1e-5)
    # the same decoded tokens from the same noise, through diffutext's sampler
    ids = torch.randint(4, len(vocab), (3, SEQ), generator=g)
    mask = torch.zeros(3, SEQ, dtype=torch.bool)
    mask[:, 10:] = True
    sampler = make_sampler("ads")
    a = generate(loaded.model, loaded.alpha_bar, sampler, 20, ids, mask, generator=torch.Generator().manual_seed(5))
    b = generate(Adapter(ref), loaded.alpha_bar, sampler, 20, ids, mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a[mask], ids[mask])


def test_imported_run_samples_and_post_trains_from_the_command_line(diffuseq_folder, tmp_path, small_task):
    folder, _, _ = diffuseq_folder
    run = tmp_path / "run"
    assert invoke("import-diffuseq", folder / "ema_0.9999_000100.pt", "--out", run).exit_code == 0
    result = invoke("sample", "--checkpoint", run, "--sampler", "ads", "--steps", 20, "--limit", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "ads-20 steps on 3 sentences" in result.output and "DiffuSeq's eval_seq2seq.py" in " ".join(result.output.split())
    grid = tmp_path / "grid"
    result = invoke(
        "ablate",
        "--checkpoint",
        run,
        "--sampler",
        "ddpm,uniform,skip,ddim,ads,dpm++",
        "--steps",
        5,
        "--limit",
        2,
        "--device",
        "cpu",
        "--out",
        grid,
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((grid / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows][:-1] == [
        ("ddpm", T),
        ("uniform", 5),
        ("skip", 5),
        ("ddim", 5),
        ("ads", 5),
        ("dpm++", 5),
    ]
    assert invoke("evaluate", "--checkpoint", run, "--steps", 5, "--limit", 2, "--device", "cpu").exit_code == 0
    post = tmp_path / "post"
    result = invoke(
        "train",
        "--init-from",
        run,
        "--distance-penalty",
        2,
        "--preset",
        "tiny",
        "--max-steps",
        2,
        "--task",
        small_task,
        "--out",
        post,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    stored = json.loads((post / "config.json").read_text())
    assert stored["model"]["arch"] == "diffuseq" and stored["diffusion"]["T"] == T and stored["train"]["distance_penalty"] == 2
    assert_one_line_error(invoke("train", "--out", run, "--resume", "--device", "cpu"), "holds no training state")


def test_diffuseq_layout_packs_as_diffuseq(diffuseq_folder):
    """[CLS] src [SEP] [SEP] [CLS] trg [SEP], the target mask from the target's [CLS]; too long: [CLS] src and [CLS] trg
    are cut together to seq_len − 3, the longer first (DiffuSeq's merge_and_mask)."""
    import numpy as np

    from diffutext.data.batches import pack_arrays, pack_one
    from diffutext.data.tokenizer import from_diffuseq_vocab

    vocab = from_diffuseq_vocab(diffuseq_folder[2], "vocab.json")
    C, S, P = vocab.cls, vocab.sep, vocab.pad
    seq, sep, cut = pack_one([10, 11], [20, 21, 22], 12, vocab, "diffuseq")
    assert seq == [C, 10, 11, S, S, C, 20, 21, 22, S] and sep == 4 and not cut
    ids, mask = np.zeros((2, 10), np.int64), np.zeros((2, 10), bool)
    n_cut = pack_arrays([[10, 11], list(range(30, 40))], [[20, 21, 22], [50, 51]], 10, vocab, ids, mask, "diffuseq")
    assert ids[0].tolist() == [C, 10, 11, S, S, C, 20, 21, 22, S] and mask[0].tolist() == [False] * 5 + [True] * 5
    # row 2: [CLS] + 10 and [CLS] + 2 tokens over a budget of 7: the source side keeps 4 ([CLS] + 3), the target 3
    assert ids[1].tolist() == [C, 30, 31, 32, S, S, C, 50, 51, S] and n_cut == 1
    assert vocab.decode([[C, 10, 11, S, P]]) == [" ".join(w for w, i in diffuseq_folder[2].items() if i in (10, 11))]


def test_a_pickle_that_is_not_a_state_dict_is_refused_and_never_runs(diffuseq_folder, tmp_path):
    folder, _, _ = diffuseq_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "training_args.json").write_text((folder / "training_args.json").read_text())
    marker = tmp_path / "ran"
    torch.save({"word_embedding.weight": Evil(marker)}, bad / "ema_0.9999_000100.pt")
    assert_one_line_error(invoke("import-diffuseq", bad, "--out", tmp_path / "run"), "refused")
    assert not marker.exists() and not (tmp_path / "run").exists()
    torch.save({"step": 3}, bad / "ema_0.9999_000100.pt")  # a plain pickle, but not of tensors
    assert_one_line_error(invoke("import-diffuseq", bad, "--out", tmp_path / "run"), "expected a state dict")


def test_a_diffuseq_v2_mean_embedding_needs_the_absorbing_state(diffuseq_folder, tmp_path):
    folder, ref, _ = diffuseq_folder
    v2 = tmp_path / "v2"
    v2.mkdir()
    for name in ("training_args.json", "vocab.json"):
        (v2 / name).write_text((folder / name).read_text())
    torch.save({**ref.state_dict(), "mean_embed": torch.zeros(HIDDEN)}, v2 / "ema_0.9999_000100.pt")
    from diffutext.config import ModelConfig

    if hasattr(ModelConfig(), "absorbing"):  # the quality options' absorbing state is there: it is imported as mask_state
        assert invoke("import-diffuseq", v2, "--out", tmp_path / "run").exit_code == 0
        assert torch.equal(load_model(tmp_path / "run").model.mask_state, torch.zeros(HIDDEN))
    else:
        assert_one_line_error(invoke("import-diffuseq", v2, "--out", tmp_path / "run"), "absorbing-state option")
