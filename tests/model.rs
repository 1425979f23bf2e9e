//! Loading model folders, and the `moe-kernels` command on good and bad input: every refusal is
//! one clear error line and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use half::bf16;
use moe_kernels::model::{Model, OwnedTensor, TensorFile, write_tensors};

fn fixture(name: &str) -> PathBuf {
    common::fixtures_dir().join(name)
}

/// A fresh scratch folder holding a copy of fixture `name`.
fn scratch_copy(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moe-kernels-test-{}-{name}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn open_err(dir: &Path) -> String {
    match Model::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn opens_every_family_and_knows_its_moe_layers() {
    for (name, moe) in [
        ("mixtral", vec![0, 1]),
        ("mixtral_sharded", vec![0, 1]),
        ("qwen2_moe", vec![1, 2]),
        ("deepseek_v2", vec![1, 2]),
        ("deepseek_v3", vec![1, 2]),
        ("llama4_text", vec![1]),
        ("llama4", vec![1]),
        ("granitemoe", vec![0, 1]),
    ] {
        let m = Model::open(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.moe_layers().unwrap(), moe, "{name}");
    }
    let llama4 = Model::open(&fixture("llama4")).unwrap();
    assert_eq!(llama4.prefix, "language_model.model.layers");
}

#[test]
fn refuses_dense_and_out_of_range_layers() {
    let m = Model::open(&fixture("deepseek_v3")).unwrap();
    let e = m.layer_config(0).unwrap_err().to_string();
    assert!(e.contains("layer 0") && e.contains("dense"), "{e}");
    let e = m.layer_config(m.layers).unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers"), "{e}");
}

#[test]
fn refuses_malformed_folders_with_the_file_and_what_was_wrong() {
    // config.json that is not JSON.
    let d = scratch_copy("mixtral", "json");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = open_err(&d);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

    // An unknown model_type.
    let d = scratch_copy("mixtral", "type");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"mixtral\"", "\"not_a_model\""),
    )
    .unwrap();
    let e = open_err(&d);
    assert!(e.contains("model_type") && e.contains("not_a_model"), "{e}");

    // A truncated weight file.
    let d = scratch_copy("mixtral", "trunc");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );

    // A header whose length field points past the file.
    let d = scratch_copy("mixtral", "header");
    let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    let e = open_err(&d);
    assert!(e.contains("header"), "{e}");

    // A shard index naming a file outside the folder.
    let d = scratch_copy("mixtral_sharded", "escape");
    let idx = std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap();
    let escaped = idx.replacen("\"model-", "\"../model-", 1);
    std::fs::write(d.join("model.safetensors.index.json"), escaped).unwrap();
    let e = open_err(&d);
    assert!(e.contains("inside the model folder"), "{e}");
}

#[test]
fn refuses_missing_and_misshapen_tensors_by_name() {
    // Rewrite the Mixtral fixture without one expert weight, and with one of the wrong shape.
    let src = TensorFile::open(&fixture("mixtral").join("model.safetensors")).unwrap();
    let missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let bent = "model.layers.1.block_sparse_moe.experts.5.w1.weight";
    let mut kept = Vec::new();
    for name in src.names() {
        let t = src.raw(&name).unwrap();
        if name == missing {
            continue;
        }
        let v: Vec<f32> = t.to_vec().unwrap();
        let shape = if name == bent {
            vec![t.shape[1], t.shape[0]]
        } else {
            t.shape.clone()
        };
        kept.push((name, OwnedTensor::f32(&shape, &v)));
    }
    let d = scratch_copy("mixtral", "tensors");
    write_tensors(&d.join("model.safetensors"), &kept).unwrap();
    let m = Model::open(&d).unwrap();
    let e = m.load_layer::<f32>(1).unwrap_err().to_string();
    assert!(
        e.contains("experts.3.w2.weight") && e.contains("missing"),
        "{e}"
    );
    // Layer 0 is untouched: it loads.
    assert!(m.load_layer::<bf16>(0).is_ok());

    let f = TensorFile::open(&d.join("model.safetensors")).unwrap();
    let t = f.raw(bent).unwrap();
    let e = t.expect_shape(&[16, 32]).unwrap_err().to_string();
    assert!(e.contains(bent) && e.contains("[32, 16]"), "{e}");

    // A float tensor asked for as ids, and ids as floats: refused with the dtype.
    let e = t.to_i64().unwrap_err().to_string();
    assert!(e.contains("I64 or I32") && e.contains("F32"), "{e}");
}

// ---- the command ----

fn cli(args: &[&str]) -> (bool, String, String) {
    // MOE_KERNELS_BIN: the GPU bundle's copy of the command.
    let bin = std::env::var("MOE_KERNELS_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe-kernels").to_string());
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run moe-kernels");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A refusal: non-zero exit, exactly one stderr line starting with "error:", no panic.
fn assert_refused(args: &[&str], needle: &str) {
    let (ok, _, err) = cli(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: stderr was {err:?}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {err} lacks {needle:?}"
    );
}

fn write_input(path: &Path, tokens: usize, hidden: usize, poison: Option<usize>) {
    let mut v: Vec<f32> = (0..tokens * hidden)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    if let Some(i) = poison {
        v[i] = f32::NAN;
    }
    write_tensors(path, &[("input", OwnedTensor::f32(&[tokens, hidden], &v))]).unwrap();
}

/// `forward` on fixture `name`'s own input, plus `extra` arguments: (ok, stdout, stderr, output).
fn forward_fixture(name: &str, extra: &[&str]) -> (bool, String, String, PathBuf) {
    let f = fixture(name);
    let layer = TensorFile::open(&f.join("io.safetensors"))
        .unwrap()
        .metadata()
        .unwrap()["layer"]
        .clone();
    let out = std::env::temp_dir().join(format!(
        "moe-kernels-fwd-{name}-{}.safetensors",
        std::process::id()
    ));
    let (input, output) = (f.join("io.safetensors"), out.clone());
    let mut args = vec![
        "forward",
        "--model",
        f.to_str().unwrap(),
        "--layer",
        &layer,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    let (ok, stdout, err) = cli(&args);
    (ok, stdout, err, out)
}

#[test]
fn forward_on_cpu_reproduces_the_fixture() {
    let (ok, stdout, err, out) = forward_fixture("qwen2_moe", &["--device", "cpu"]);
    assert!(ok, "{stdout}{err}");
    let got = TensorFile::open(&out).unwrap();
    let want = TensorFile::open(&fixture("qwen2_moe").join("io.safetensors")).unwrap();
    let ids = got.raw("topk_ids").unwrap();
    assert_eq!(ids.shape, [7, 4]);
    assert_eq!(
        ids.to_i64().unwrap(),
        want.raw("topk_ids").unwrap().to_i64().unwrap()
    );
    assert_eq!(ids.dtype, safetensors::Dtype::I64);
    let y: Vec<f32> = got.raw("output").unwrap().to_vec().unwrap();
    let r: Vec<f32> = want.raw("output").unwrap().to_vec().unwrap();
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in y.iter().zip(&r) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
    // The weights in the ids' (ascending) order, f32.
    let w = got.raw("topk_weights").unwrap();
    assert_eq!(
        (w.dtype, w.shape.as_slice()),
        (safetensors::Dtype::F32, &[7, 4][..])
    );
    let (w, rw): (Vec<f32>, Vec<f32>) = (
        w.to_vec().unwrap(),
        want.raw("topk_weights").unwrap().to_vec().unwrap(),
    );
    for (a, b) in w.iter().zip(&rw) {
        assert!((a - b).abs() <= 1e-6, "weight {a} vs {b}");
    }
    assert_eq!(got.raw("output").unwrap().dtype, safetensors::Dtype::F32);
}

#[test]
fn forward_takes_given_routing_and_expert_masks() {
    // transformers' own routing given back (the fixture's topk_ids and topk_weights): the same
    // output as the router's.
    let want = TensorFile::open(&fixture("qwen2_moe").join("io.safetensors")).unwrap();
    let io = fixture("qwen2_moe").join("io.safetensors");
    let io = io.to_str().unwrap();
    let (ok, stdout, err, out) =
        forward_fixture("qwen2_moe", &["--device", "cpu", "--topk-ids", io]);
    assert!(ok, "{stdout}{err}");
    let got = TensorFile::open(&out).unwrap();
    let y: Vec<f32> = got.raw("output").unwrap().to_vec().unwrap();
    let r: Vec<f32> = want.raw("output").unwrap().to_vec().unwrap();
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in y.iter().zip(&r) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
    // Masking two of the experts the router chose for token 0: no token gets them.
    let chosen = want.raw("topk_ids").unwrap().to_i64().unwrap();
    let masked = format!("{},{}", chosen[0], chosen[1]);
    let (ok, stdout, err, out) =
        forward_fixture("qwen2_moe", &["--device", "cpu", "--mask-experts", &masked]);
    assert!(ok, "{stdout}{err}");
    let ids = TensorFile::open(&out)
        .unwrap()
        .raw("topk_ids")
        .unwrap()
        .to_i64()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(ids.len(), chosen.len());
    assert!(
        ids.iter().all(|&i| i != chosen[0] && i != chosen[1]),
        "{ids:?} holds a masked expert ({masked})"
    );
    // Bad controls: an expert out of range, both controls at once, a routing file of another
    // shape or with a repeated id.
    let (ok, _, err, _) = forward_fixture("qwen2_moe", &["--device", "cpu", "--mask-experts", "8"]);
    assert!(
        !ok && err.contains("--mask-experts") && err.contains("[0, 8)"),
        "{err}"
    );
    let (ok, _, err, _) = forward_fixture(
        "qwen2_moe",
        &["--device", "cpu", "--mask-experts", "1", "--topk-ids", io],
    );
    assert!(!ok && err.contains("--topk-ids"), "{err}");
    let tmp = std::env::temp_dir().join(format!("moe-kernels-topk-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (t, k) = (7, 4);
    let ids_i64: Vec<i64> = chosen.clone();
    let w: Vec<f32> = want.raw("topk_weights").unwrap().to_vec().unwrap();
    for (file, ids, shape, needle) in [
        (
            "short.safetensors",
            ids_i64[..k * (t - 1)].to_vec(),
            [t - 1, k],
            "shape",
        ),
        (
            "repeat.safetensors",
            {
                let mut v = ids_i64.clone();
                v[1] = v[0];
                v
            },
            [t, k],
            "at most once",
        ),
        (
            "range.safetensors",
            {
                let mut v = ids_i64.clone();
                v[5] = 8;
                v
            },
            [t, k],
            "[-1, 8)",
        ),
    ] {
        let path = tmp.join(file);
        let n = shape[0] * shape[1];
        write_tensors(
            &path,
            &[
                ("topk_ids", OwnedTensor::i64(&shape, &ids)),
                ("topk_weights", OwnedTensor::f32(&shape, &w[..n])),
            ],
        )
        .unwrap();
        let (ok, _, err, _) = forward_fixture(
            "qwen2_moe",
            &["--device", "cpu", "--topk-ids", path.to_str().unwrap()],
        );
        assert!(
            !ok && err.contains(needle) && err.lines().count() == 1,
            "{file}: {err}"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn forward_defaults_to_cuda_or_says_why_not() {
    let (ok, stdout, err, _) = forward_fixture("olmoe", &[]);
    assert!(ok, "{stdout}{err}");
    let gpu = moe_kernels::Device::new(0).is_ok() && moe_kernels::kernels::built();
    if gpu {
        assert!(
            stdout.contains("on cuda") && err.is_empty(),
            "{stdout}{err}"
        );
    } else {
        assert!(stdout.contains("on cpu"), "{stdout}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("running on cpu"), "{err}");
    }
}

#[test]
fn forward_refuses_bad_input_with_one_error_line() {
    let tmp = std::env::temp_dir().join(format!("moe-kernels-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let model = fixture("mixtral");
    let m = model.to_str().unwrap();
    let out = tmp.join("out.safetensors");
    let o = out.to_str().unwrap();

    let wide = tmp.join("wide.safetensors");
    write_input(&wide, 3, 48, None);
    let nan = tmp.join("nan.safetensors");
    write_input(&nan, 3, 32, Some(40));
    let garbage = tmp.join("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}",
    )
    .unwrap();
    let truncated = tmp.join("truncated.safetensors");
    write_input(&truncated, 3, 32, None);
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 8]).unwrap();
    let good = tmp.join("good.safetensors");
    write_input(&good, 3, 32, None);

    let run = |input: &Path, layer: &str| -> Vec<String> {
        ["forward", "--model", m, "--layer", layer, "--input"]
            .iter()
            .map(|s| s.to_string())
            .chain([
                input.to_str().unwrap().to_string(),
                "--output".into(),
                o.into(),
                "--device".into(),
                "cpu".into(),
            ])
            .collect()
    };
    let check = |args: Vec<String>, needle: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&a, needle);
    };
    check(run(&wide, "1"), "[T, 32]");
    check(run(&nan, "1"), "finite");
    check(run(&garbage, "1"), "header");
    check(run(&truncated, "1"), "header");
    // --check compares cuda with cpu: not with --device cpu.
    let mut with_check = run(&good, "1");
    with_check.push("--check".into());
    check(with_check, "--check");
    check(run(&good, "2"), "layer index below 2");
    check(
        run(&tmp.join("absent.safetensors"), "1"),
        "absent.safetensors",
    );

    // A broken model folder.
    let d = scratch_copy("mixtral", "cli");
    std::fs::write(d.join("config.json"), "[1, 2").unwrap();
    let mut args = run(&good, "1");
    args[2] = d.to_str().unwrap().to_string();
    check(args, "JSON");
    let d = scratch_copy("mixtral", "cli-trunc");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let mut args = run(&good, "1");
    args[2] = d.to_str().unwrap().to_string();
    check(args, "model.safetensors");

    // The dense layer of a DeepSeek-V3 model.
    let ds = fixture("deepseek_v3");
    let mut args = run(&good, "0");
    args[2] = ds.to_str().unwrap().to_string();
    check(args, "dense");
}

#[test]
fn bench_refuses_unknown_presets_and_formats() {
    assert_refused(&["bench", "--format", "int3"], "int3");
    assert_refused(&["bench", "--gemm", "v9"], "v9");
    if moe_kernels::Device::new(0).is_ok() && moe_kernels::kernels::built() {
        assert_refused(&["bench", "--preset", "nope"], "nope");
    }
}

#[test]
fn corrupted_files_are_refused_never_a_panic() {
    // Seeded corruptions of a real checkpoint: bytes flipped in the header and in the data,
    // truncations at many lengths, and config.json edits. Every load either works or returns an
    // error; a panic fails the test. Loads that succeed must still give finite-shaped weights.
    let src = fixture("qwen2_moe");
    let model_bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let header_len = u64::from_le_bytes(model_bytes[..8].try_into().unwrap()) as usize;
    let mut rng = moe_kernels::rng::Rng::new(99);
    let d = scratch_copy("qwen2_moe", "corrupt");
    let (mut refused, mut loaded) = (0, 0);
    for case in 0..120 {
        let mut bytes = model_bytes.clone();
        let mut cfg = config.clone();
        match case % 4 {
            0 => {
                // A few bytes of the header.
                for _ in 0..3 {
                    let at = 8 + rng.below(header_len as u64) as usize;
                    bytes[at] = rng.below(256) as u8;
                }
            }
            1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
            2 => {
                // The length field itself.
                let v = rng.next_u64() >> rng.below(64);
                bytes[..8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                // A number in config.json replaced by something else.
                let keys = [
                    "hidden_size",
                    "num_experts",
                    "num_experts_per_tok",
                    "moe_intermediate_size",
                    "shared_expert_intermediate_size",
                    "num_hidden_layers",
                ];
                let key = keys[rng.below(keys.len() as u64) as usize];
                let values = ["0", "-3", "1e30", "\"x\"", "null", "3", "100000000000"];
                let value = values[rng.below(values.len() as u64) as usize];
                let start = cfg.find(&format!("\"{key}\": ")).map(|i| i + key.len() + 4);
                if let Some(s) = start {
                    let end = s + cfg[s..].find([',', '\n']).unwrap();
                    cfg.replace_range(s..end, value);
                }
            }
        }
        std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
        std::fs::write(d.join("config.json"), &cfg).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let m = Model::open(&d)?;
            let layer = m.moe_layers()?.first().copied().unwrap_or(1);
            m.load_layer::<f32>(layer).map(|_| ())
        });
        match outcome {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Err(_) => panic!("case {case} panicked"),
        }
    }
    assert!(
        refused >= 60,
        "only {refused} of 120 corruptions were refused"
    );
    eprintln!("{refused} refused, {loaded} loaded");
}

/// The parts of one Linear in a GPTQ (v2 zero points) or AWQ checkpoint, packed from `m`:
/// (suffix, tensor) pairs.
fn export_int(m: &moe_kernels::quant::IntMatrix, awq: bool) -> Vec<(&'static str, OwnedTensor)> {
    let (n, kd, g) = (m.n(), m.kdim(), m.group());
    let groups = kd / g;
    let i32s = |shape: &[usize], v: &[u32]| OwnedTensor {
        dtype: safetensors::Dtype::I32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    // AWQ's nibble j of a word holds column ORDER[j] of its eight.
    const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
    let pack_n = |value: &dyn Fn(usize, usize) -> u32, rows: usize| -> Vec<u32> {
        let mut out = vec![0u32; rows * n / 8];
        for a in 0..rows {
            for r in 0..n {
                let j = if awq {
                    ORDER.iter().position(|&o| o == r % 8).unwrap()
                } else {
                    r % 8
                };
                out[a * (n / 8) + r / 8] |= value(a, r) << (4 * j);
            }
        }
        out
    };
    let qweight = if awq {
        i32s(&[kd, n / 8], &pack_n(&|k, r| m.code(r, k), kd))
    } else {
        // GPTQ packs along Kd: word (i, r) holds inputs 8i..8i+8 of output r.
        let mut v = vec![0u32; kd / 8 * n];
        for r in 0..n {
            for k in 0..kd {
                v[(k / 8) * n + r] |= m.code(r, k) << (4 * (k % 8));
            }
        }
        i32s(&[kd / 8, n], &v)
    };
    let qzeros = i32s(&[groups, n / 8], &pack_n(&|gi, r| m.zero(r, gi), groups));
    let mut scales = vec![half::f16::ZERO; groups * n];
    for r in 0..n {
        for gi in 0..groups {
            scales[gi * n + r] = m.scales()[r * groups + gi];
        }
    }
    let scales = OwnedTensor {
        dtype: safetensors::Dtype::F16,
        shape: vec![groups, n],
        bytes: scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    vec![("qweight", qweight), ("qzeros", qzeros), ("scales", scales)]
}

#[test]
fn gptq_and_awq_experts_load_packed_and_decode_exactly() {
    use moe_kernels::layer::{Experts, reference};
    use moe_kernels::quant::{IntMatrix, QuantMatrix};
    let src = TensorFile::open(&fixture("mixtral").join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(fixture("mixtral").join("config.json")).unwrap();
    for (method, awq, per_channel) in [
        ("gptq", false, false),
        ("awq", true, false),
        ("gptq", false, true),
    ] {
        // Layer 1's experts quantised to 4 bits in groups of 16 with zero points, written in
        // the checkpoint's layout; everything else as it was.
        let mut kept: Vec<(String, OwnedTensor)> = Vec::new();
        let mut want: Vec<(String, IntMatrix)> = Vec::new();
        for name in src.names() {
            let t = src.raw(&name).unwrap();
            let v: Vec<f32> = t.to_vec().unwrap();
            let expert = name.starts_with("model.layers.1.block_sparse_moe.experts.");
            if expert {
                let base = name.strip_suffix(".weight").unwrap().to_string();
                // group_size -1: one group per row, whatever the Linear's width.
                let group = if per_channel { t.shape[1] } else { 16 };
                let m = IntMatrix::quantize(&v, t.shape[0], t.shape[1], 4, group, true).unwrap();
                for (part, tensor) in export_int(&m, awq) {
                    kept.push((format!("{base}.{part}"), tensor));
                }
                want.push((base, m));
            } else {
                kept.push((name.clone(), OwnedTensor::f32(&t.shape, &v)));
            }
        }
        let d = scratch_copy("mixtral", &format!("{method}-{per_channel}"));
        write_tensors(&d.join("model.safetensors"), &kept).unwrap();
        let quant = if awq {
            r#""quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": true},"#
        } else if per_channel {
            r#""quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": false, "sym": false, "checkpoint_format": "gptq_v2"},"#
        } else {
            r#""quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": false, "sym": false, "checkpoint_format": "gptq_v2"},"#
        };
        std::fs::write(
            d.join("config.json"),
            config.replacen('{', &format!("{{{quant}"), 1),
        )
        .unwrap();

        let model = Model::open(&d).unwrap();
        let (cfg, w) = model.load_layer::<f32>(1).unwrap();
        let Experts::Packed { gate_up, down } = &w.experts else {
            panic!("{method}: experts were decoded at load time");
        };
        let find = |e: usize, p: &str| {
            let base = format!("model.layers.1.block_sparse_moe.experts.{e}.{p}");
            QuantMatrix::Int(want.iter().find(|(b, _)| *b == base).unwrap().1.clone())
        };
        for e in 0..cfg.experts {
            let stacked = [find(e, "w1").decode(), find(e, "w3").decode()].concat();
            assert_eq!(gate_up[e].decode(), stacked, "{method} expert {e} gate/up");
            assert_eq!(
                down[e].decode(),
                find(e, "w2").decode(),
                "{method} expert {e} down"
            );
        }
        // The packed layer's CPU forward equals the same block with the decoded weights.
        let plain = moe_kernels::layer::LayerWeights {
            experts: Experts::Plain {
                gate_up: gate_up.iter().flat_map(QuantMatrix::decode).collect(),
                down: down.iter().flat_map(QuantMatrix::decode).collect(),
            },
            ..w.clone()
        };
        let x: Vec<f64> = (0..5 * cfg.hidden)
            .map(|i| ((i * 7919 % 211) as f64 / 105.0) - 1.0)
            .collect();
        let (a, b) = (
            reference::forward(&cfg, &w, &x).unwrap(),
            reference::forward(&cfg, &plain, &x).unwrap(),
        );
        assert_eq!(a.y, b.y, "{method}");
        assert_eq!(a.routing.ids, b.routing.ids);
    }
}

#[test]
fn refuses_quantisation_it_does_not_read() {
    let config = std::fs::read_to_string(fixture("mixtral").join("config.json")).unwrap();
    for (q, needle) in [
        (r#"{"quant_method": "bitsandbytes"}"#, "bitsandbytes"),
        (r#"{"quant_method": "gptq", "bits": 3}"#, "bits"),
        (r#"{"quant_method": "awq", "version": "gemv"}"#, "gemv"),
        (
            r#"{"quant_method": "fp8", "weight_block_size": [64, 64]}"#,
            "[128, 128]",
        ),
    ] {
        let d = scratch_copy("mixtral", "quant-refused");
        let cfg = config.replacen('{', &format!("{{\"quantization_config\": {q},"), 1);
        std::fs::write(d.join("config.json"), cfg).unwrap();
        let e = open_err(&d);
        assert!(
            e.contains("quantization_config") && e.contains(needle),
            "{e}"
        );
    }
}

#[test]
fn refuses_a_misshapen_expert_by_name_through_the_loader() {
    let src = TensorFile::open(&fixture("mixtral").join("model.safetensors")).unwrap();
    let bent = "model.layers.1.block_sparse_moe.experts.5.w1.weight";
    let kept: Vec<(String, OwnedTensor)> = src
        .names()
        .into_iter()
        .map(|name| {
            let t = src.raw(&name).unwrap();
            let v: Vec<f32> = t.to_vec().unwrap();
            let shape = if name == bent {
                vec![t.shape[1], t.shape[0]]
            } else {
                t.shape.clone()
            };
            (name, OwnedTensor::f32(&shape, &v))
        })
        .collect();
    let d = scratch_copy("mixtral", "bent");
    write_tensors(&d.join("model.safetensors"), &kept).unwrap();
    let e = Model::open(&d)
        .unwrap()
        .load_layer::<f32>(1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(bent) && e.contains("[16, 32]") && e.contains("[32, 16]"),
        "{e}"
    );
}

#[test]
fn absent_config_keys_take_the_config_class_defaults() {
    // DeepSeek-V3 without its group and scaling keys: transformers' defaults are n_group 8,
    // topk_group 4, routed_scaling_factor 2.5.
    let d = scratch_copy("deepseek_v3", "defaults");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    for key in ["n_group", "topk_group", "routed_scaling_factor"] {
        v.as_object_mut().unwrap().remove(key);
    }
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let cfg = Model::open(&d).unwrap().layer_config(1).unwrap();
    assert_eq!(cfg.router.rule.groups(), Some((8, 4)));
    assert_eq!(cfg.router.scale, 2.5);
    // Without first_k_dense_replace, its default of 3 makes layers 0..3 dense.
    v.as_object_mut().unwrap().remove("first_k_dense_replace");
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let m = Model::open(&d).unwrap();
    assert!(m.moe_layers().unwrap().is_empty());
    // A layer count no model has is refused when the folder is opened.
    v["num_hidden_layers"] = serde_json::json!(10_000_000_000_000u64);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let e = open_err(&d);
    assert!(e.contains("num_hidden_layers"), "{e}");
}

/// The command's cuda path on every fixture, against its CPU forward (`--check`): the same
/// experts but at near-ties, the output within 3% of its scale. On the CPU emulator this runs
/// every kernel of the layer as the command runs them.
#[test]
fn gpu_forward_check_on_every_fixture() {
    if common::gpu("gpu_forward_check_on_every_fixture").is_none() {
        return;
    }
    let mut names: Vec<String> = std::fs::read_dir(common::fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("io.safetensors").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 19, "fixtures: {names:?}");
    for name in &names {
        // bf16: the cuda path computes in bf16 or f16, and some fixtures are stored in f32.
        let args = ["--device", "cuda", "--dtype", "bf16", "--check"];
        let (ok, stdout, err, out) = forward_fixture(name, &args);
        let _ = std::fs::remove_file(&out);
        assert!(
            ok,
            "{name}: forward --device cuda --check failed:\n{stdout}{err}"
        );
        assert!(
            !err.contains("running on cpu"),
            "{name}: fell back to the CPU: {err}"
        );
        let check = stdout.lines().find(|l| l.starts_with("check:"));
        println!(
            "{name}: {}",
            check.unwrap_or_else(|| panic!("{name}: no check line in {stdout}"))
        );
    }
    // The routing controls through the command: experts masked, and transformers' own routing
    // given back (the fixture's topk_ids and topk_weights).
    for name in ["deepseek_v3", "gpt_oss", "qwen2_moe"] {
        let io = common::fixtures_dir().join(name).join("io.safetensors");
        for extra in [
            ["--mask-experts", "0,3"],
            ["--topk-ids", io.to_str().unwrap()],
        ] {
            let args = [
                "--device", "cuda", "--dtype", "bf16", "--check", extra[0], extra[1],
            ];
            let (ok, stdout, err, out) = forward_fixture(name, &args);
            let _ = std::fs::remove_file(&out);
            assert!(ok, "{name} {extra:?}: {stdout}{err}");
        }
    }
}
