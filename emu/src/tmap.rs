//! cuTensorMapEncodeTiled: checks a tiled tensor map's parameters as the CUDA driver API's
//! documentation lists them and writes the emulator's encoding (`TensorMap`, the mirror of
//! emu/include/moe_emu/tensor_map.h) into the caller's 128-byte CUtensorMap, which the kernels'
//! cp.async.bulk.tensor twin reads (emu/runtime/hopper.cpp).

use std::ffi::{c_uint, c_void};

use cudarc::driver::sys::{CUresult, cudaError_enum as E};

use crate::fail;

/// "TMAP", as `kTensorMapMagic`.
const MAGIC: u32 = 0x544d_4150;

/// emu/include/moe_emu/tensor_map.h's `TensorMap`, field for field.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct TensorMap {
    magic: u32,
    dtype: u32,
    rank: u32,
    elem_bytes: u32,
    interleave: u32,
    swizzle: u32,
    l2_promotion: u32,
    oob_fill: u32,
    addr: u64,
    dims: [u64; 5],
    strides: [u64; 4],
    boxes: [u16; 5],
    elem_strides: [u8; 5],
    pad: [u8; 1],
}
const _: () = assert!(size_of::<TensorMap>() == 128);

/// The size of a `CUtensorMapDataType`'s element; None for the packed sub-byte types.
fn elem_bytes(dtype: u32) -> Option<u32> {
    Some(match dtype {
        0 => 1,                   // UINT8
        1 | 6 | 9 => 2,           // UINT16, FLOAT16, BFLOAT16
        2 | 3 | 7 | 10..=12 => 4, // UINT32, INT32, FLOAT32 (+FTZ), TFLOAT32 (+FTZ)
        4 | 5 | 8 => 8,           // UINT64, INT64, FLOAT64
        _ => return None,
    })
}

fn invalid(msg: String) -> CUresult {
    fail(
        E::CUDA_ERROR_INVALID_VALUE,
        format!("cuTensorMapEncodeTiled: {msg}"),
    )
}

/// # Safety
/// The pointers must be valid for the counts `rank` gives (the driver API's contract).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    map: *mut c_void,
    dtype: c_uint,
    rank: c_uint,
    addr: *mut c_void,
    dims: *const u64,
    strides: *const u64,
    boxes: *const u32,
    elem_strides: *const u32,
    interleave: c_uint,
    swizzle: c_uint,
    l2_promotion: c_uint,
    oob_fill: c_uint,
) -> CUresult {
    if map.is_null() || dims.is_null() || boxes.is_null() || elem_strides.is_null() {
        return invalid("a null pointer".into());
    }
    if !(map as usize).is_multiple_of(64) {
        return invalid(format!("tensorMap {map:?} is not 64-byte aligned"));
    }
    if !(1..=5).contains(&rank) {
        return invalid(format!("tensorRank {rank} (1 to 5)"));
    }
    let r = rank as usize;
    let Some(e) = elem_bytes(dtype) else {
        return fail(
            E::CUDA_ERROR_NOT_SUPPORTED,
            format!(
                "cuTensorMapEncodeTiled: data type {dtype} is not implemented by the CPU emulator"
            ),
        );
    };
    if interleave != 0 {
        return fail(
            E::CUDA_ERROR_NOT_SUPPORTED,
            "cuTensorMapEncodeTiled: interleaved layouts are not implemented by the CPU emulator",
        );
    }
    if swizzle > 3 {
        return fail(
            E::CUDA_ERROR_NOT_SUPPORTED,
            format!(
                "cuTensorMapEncodeTiled: swizzle mode {swizzle} is not implemented by the CPU emulator"
            ),
        );
    }
    if oob_fill != 0 {
        return fail(
            E::CUDA_ERROR_NOT_SUPPORTED,
            "cuTensorMapEncodeTiled: the NaN out-of-bounds fill is not implemented by the CPU emulator",
        );
    }
    if !(addr as usize).is_multiple_of(16) {
        return invalid(format!("globalAddress {addr:?} is not 16-byte aligned"));
    }
    if r > 1 && strides.is_null() {
        return invalid("globalStrides is null for a rank above 1".into());
    }
    // SAFETY: the caller's contract: rank entries (rank - 1 strides).
    let (dims, boxes, es) = unsafe {
        (
            std::slice::from_raw_parts(dims, r),
            std::slice::from_raw_parts(boxes, r),
            std::slice::from_raw_parts(elem_strides, r),
        )
    };
    let strides: &[u64] = if r > 1 {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(strides, r - 1) }
    } else {
        &[]
    };
    let mut m = TensorMap {
        magic: MAGIC,
        dtype,
        rank,
        elem_bytes: e,
        interleave,
        swizzle,
        l2_promotion,
        oob_fill,
        addr: addr as u64,
        ..Default::default()
    };
    for i in 0..r {
        if dims[i] == 0 || dims[i] > 1 << 32 {
            return invalid(format!("globalDim[{i}] = {} (1 to 2^32)", dims[i]));
        }
        if boxes[i] == 0 || boxes[i] > 256 {
            return invalid(format!("boxDim[{i}] = {} (1 to 256)", boxes[i]));
        }
        if !(1..=8).contains(&es[i]) {
            return invalid(format!("elementStrides[{i}] = {} (1 to 8)", es[i]));
        }
        if es[i] != 1 {
            return fail(
                E::CUDA_ERROR_NOT_SUPPORTED,
                "cuTensorMapEncodeTiled: element strides other than 1 are not implemented by the CPU \
                 emulator",
            );
        }
        m.dims[i] = dims[i];
        m.boxes[i] = boxes[i] as u16;
        m.elem_strides[i] = es[i] as u8;
    }
    for (i, &s) in strides.iter().enumerate() {
        if !s.is_multiple_of(16) || s >= 1 << 40 {
            return invalid(format!(
                "globalStrides[{i}] = {s} (a multiple of 16 below 2^40)"
            ));
        }
        m.strides[i] = s;
    }
    let inner = boxes[0] * e;
    if !inner.is_multiple_of(16) {
        return invalid(format!(
            "boxDim[0] * element size = {inner} bytes, not a multiple of 16"
        ));
    }
    let span = [0, 32, 64, 128][swizzle as usize];
    if span > 0 && inner > span {
        return invalid(format!(
            "boxDim[0] * element size = {inner} bytes, past the {span}-byte swizzle span"
        ));
    }
    if span > 0 && inner < span {
        // The documentation does not say how such a box lies in shared memory.
        return fail(
            E::CUDA_ERROR_NOT_SUPPORTED,
            format!(
                "cuTensorMapEncodeTiled: a box row of {inner} bytes under a {span}-byte swizzle: \
                 the CPU emulator models swizzled boxes whose rows fill the span"
            ),
        );
    }
    // SAFETY: map is non-null and 64-byte aligned, and a CUtensorMap is 128 bytes.
    unsafe { std::ptr::write(map.cast::<TensorMap>(), m) };
    E::CUDA_SUCCESS
}
