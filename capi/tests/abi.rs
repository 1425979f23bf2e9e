//! The C ABI's contract without a GPU: the header declares exactly what the library exports,
//! with the same parameter counts and status codes, and calls with bad arguments come back as
//! codes and messages. (examples/c/run.sh runs a real forward through it.)

use std::collections::BTreeMap;
use std::ffi::CStr;

use moe_kernels_c::{
    Status, moe_last_error, moe_layer_check, moe_layer_destroy, moe_layer_dims, moe_layer_forward,
    moe_layer_forward_routed, moe_layer_open, moe_layer_set_expert_masks,
};

/// `name -> parameter count` of every `moe_*` function in `text`, found by `start`.
fn functions(text: &str, start: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (i, _) in text.match_indices(start) {
        let rest = &text[i + start.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.starts_with("moe_") {
            continue;
        }
        let open = i + start.len() + name.len();
        if !text[open..].starts_with('(') {
            continue;
        }
        let close = open + text[open..].find(')').expect("a closing parenthesis");
        let params = text[open + 1..close].trim();
        let n = if params == "void" {
            0
        } else {
            params.split(',').filter(|p| !p.trim().is_empty()).count()
        };
        out.insert(name, n);
    }
    out
}

#[test]
fn the_header_declares_what_the_library_exports() {
    let root = env!("CARGO_MANIFEST_DIR");
    let header = std::fs::read_to_string(format!("{root}/include/moe_kernels.h")).unwrap();
    let source = std::fs::read_to_string(format!("{root}/src/lib.rs")).unwrap();
    // In the header every declaration is "<type> moe_name(" (a pointer type ends in '*').
    let mut declared = functions(&header, " ");
    declared.extend(functions(&header, "*"));
    let exported = functions(&source, "extern \"C\" fn ");
    assert!(!exported.is_empty());
    assert_eq!(
        declared, exported,
        "header (left) and capi/src/lib.rs (right) disagree"
    );
    // Every status code, with its value.
    for (name, code) in [
        ("MOE_OK", Status::Ok),
        ("MOE_ERROR_NULL", Status::Null),
        ("MOE_ERROR_ARGUMENT", Status::Argument),
        ("MOE_ERROR_CHECKPOINT", Status::Checkpoint),
        ("MOE_ERROR_UNSUPPORTED", Status::Unsupported),
        ("MOE_ERROR_NO_DEVICE", Status::NoDevice),
        ("MOE_ERROR_CUDA", Status::Cuda),
        ("MOE_ERROR_DEVICE_CHECK", Status::DeviceCheck),
        ("MOE_ERROR_PANIC", Status::Panic),
    ] {
        let line = format!("{name} = {}", code as i32);
        assert!(header.contains(&line), "the header lacks `{line}`");
    }
    assert!(header.contains("MOE_BF16 = 0") && header.contains("MOE_F16 = 1"));
    assert_eq!(
        (moe_kernels_c::DTYPE_BF16, moe_kernels_c::DTYPE_F16),
        (0, 1)
    );
}

fn last() -> String {
    // SAFETY: the library keeps the thread's message alive until its next failing call.
    unsafe { CStr::from_ptr(moe_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn bad_arguments_come_back_as_codes_and_messages() {
    let mut out = std::ptr::null_mut();
    // SAFETY (each call): the arguments are refused before anything is dereferenced but `out`,
    // which is valid.
    unsafe {
        let s = moe_layer_open(std::ptr::null(), 0, 0, std::ptr::null_mut(), 0, 4, &mut out);
        assert_eq!(s, Status::Null);
        assert!(
            last().contains("moe_layer_open: argument `model_dir`"),
            "{}",
            last()
        );
        assert!(out.is_null());
        let s = moe_layer_open(c"x".as_ptr(), 0, 0, std::ptr::null_mut(), 0, 0, &mut out);
        assert_eq!(s, Status::Argument);
        assert!(
            last().contains("`max_tokens`") && last().contains("got 0"),
            "{}",
            last()
        );
        let s = moe_layer_open(c"x".as_ptr(), -1, 0, std::ptr::null_mut(), 0, 4, &mut out);
        assert_eq!(s, Status::Argument);
        assert!(last().contains("`layer`"), "{}", last());
        let s = moe_layer_open(
            c"x".as_ptr(),
            0,
            0,
            std::ptr::null_mut(),
            0,
            4,
            std::ptr::null_mut(),
        );
        assert_eq!(s, Status::Null);
        assert!(last().contains("`out`"), "{}", last());
        assert_eq!(
            moe_layer_forward(std::ptr::null_mut(), 1, 1, 1, 0, 0),
            Status::Null
        );
        assert!(last().contains("`layer`"), "{}", last());
        assert_eq!(
            moe_layer_forward_routed(std::ptr::null_mut(), 1, 1, 1, 0, 0, 0),
            Status::Null
        );
        assert!(
            last().contains("moe_layer_forward_routed: argument `layer`"),
            "{}",
            last()
        );
        assert_eq!(
            moe_layer_set_expert_masks(std::ptr::null_mut(), std::ptr::null(), std::ptr::null(), 0),
            Status::Null
        );
        assert!(last().contains("`layer`"), "{}", last());
        assert_eq!(moe_layer_check(std::ptr::null_mut()), Status::Null);
        let (mut a, mut b, mut c) = (0, 0, 0);
        assert_eq!(
            moe_layer_dims(std::ptr::null(), &mut a, &mut b, &mut c),
            Status::Null
        );
        moe_layer_destroy(std::ptr::null_mut());
    }
}
