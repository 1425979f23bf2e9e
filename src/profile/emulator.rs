//! The CPU emulator's counter functions, reached through the driver library it replaces.
//!
//! Under `scripts/emulate` the emulator is the process's `libcuda.so.1`. [`Emulator::find`]
//! looks for it among the libraries already loaded (it never loads one), so it finds nothing
//! before the crate has opened the driver (a [`crate::Device`] exists) and nothing on a real
//! driver, which lacks the functions.

use std::ffi::{CStr, CString, c_char, c_double, c_int, c_uint};

use super::ptxas::{self, Resources};
use super::record::LaunchRecord;
use crate::error::{Error, Result};

type EnableFn = unsafe extern "C" fn(c_int) -> c_int;
type TakeFn = unsafe extern "C" fn() -> *mut c_char;
type FreeFn = unsafe extern "C" fn(*mut c_char);
type SetResourcesFn = unsafe extern "C" fn(*const c_char, c_uint, c_uint, c_uint) -> c_int;
type SetSampleFn = unsafe extern "C" fn(c_double) -> c_int;

/// The emulator's counter functions, with the library that holds them kept open.
pub struct Emulator {
    enable: EnableFn,
    take: TakeFn,
    free: FreeFn,
    set_resources: SetResourcesFn,
    set_sample: SetSampleFn,
    // Keeps the code behind the function pointers mapped; dropped last.
    _library: Library,
}

#[cfg(target_os = "linux")]
type Library = libloading::os::unix::Library;
#[cfg(not(target_os = "linux"))]
type Library = ();

/// The names the driver is loaded by, in the order to look.
const DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];

impl Emulator {
    /// The emulator, when it is the driver loaded in this process; `None` otherwise (no driver
    /// loaded yet, or a real one).
    pub fn find() -> Option<Emulator> {
        #[cfg(target_os = "linux")]
        {
            use libloading::os::unix::RTLD_NOW;
            // glibc and musl: only return a handle to a library that is already loaded.
            const RTLD_NOLOAD: c_int = 0x4;
            DRIVER_NAMES.iter().find_map(|name| {
                // SAFETY: RTLD_NOLOAD makes dlopen return an already loaded library (taking a
                // reference) or fail; it runs no initialiser, since nothing new is loaded.
                let lib = unsafe { Library::open(Some(*name), RTLD_NOW | RTLD_NOLOAD) }.ok()?;
                Emulator::bind(lib)
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = DRIVER_NAMES;
            None
        }
    }

    #[cfg(target_os = "linux")]
    fn bind(lib: Library) -> Option<Emulator> {
        // SAFETY: each type is the C signature the emulator exports under that name (emu/src/
        // counters.rs); a library without all five names is not the emulator and is dropped.
        unsafe {
            let enable = *lib.get::<EnableFn>("moe_emu_counters_enable").ok()?;
            let take = *lib.get::<TakeFn>("moe_emu_counters_take").ok()?;
            let free = *lib.get::<FreeFn>("moe_emu_counters_free").ok()?;
            let set_resources = *lib.get::<SetResourcesFn>("moe_emu_set_resources").ok()?;
            let set_sample = *lib.get::<SetSampleFn>("moe_emu_set_sample").ok()?;
            Some(Emulator {
                enable,
                take,
                free,
                set_resources,
                set_sample,
                _library: lib,
            })
        }
    }

    /// Starts (`true`) or stops collecting a record per launch.
    pub fn enable(&self, on: bool) -> Result<()> {
        // SAFETY: a plain int in, an int out; `self` keeps the library loaded.
        let rc = unsafe { (self.enable)(c_int::from(on)) };
        refused(
            "Emulator::enable",
            "on",
            "0 from moe_emu_counters_enable",
            rc,
        )
    }

    /// The records of the launches since the last call, oldest first.
    pub fn take(&self) -> Result<Vec<LaunchRecord>> {
        // SAFETY: the emulator returns a malloc'd NUL-terminated string (or null) that we own
        // until we hand it back to moe_emu_counters_free, exactly once, below.
        let text = unsafe {
            let p = (self.take)();
            if p.is_null() {
                return Err(Error::Unsupported {
                    op: "Emulator::take",
                    what: "moe_emu_counters_take returned no buffer (out of memory)".into(),
                });
            }
            let text = CStr::from_ptr(p).to_str().map(str::to_owned);
            (self.free)(p);
            text
        };
        let text = text.map_err(|e| {
            Error::shape(
                "Emulator::take",
                "records",
                "UTF-8 JSON lines",
                format!("invalid UTF-8 ({e})"),
            )
        })?;
        LaunchRecord::parse_lines(&text)
    }

    /// Runs only the first `fraction` of each grid's blocks (at least one), the counters scaled
    /// to the whole grid; 1 runs every block. The outputs of a sampled launch are incomplete.
    pub fn set_sample(&self, fraction: f64) -> Result<()> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::shape(
                "Emulator::set_sample",
                "fraction",
                "a fraction in (0, 1]",
                fraction.to_string(),
            ));
        }
        // SAFETY: a double in, an int out; `self` keeps the library loaded.
        let rc = unsafe { (self.set_sample)(fraction) };
        refused(
            "Emulator::set_sample",
            "fraction",
            "0 from moe_emu_set_sample",
            rc,
        )
    }

    /// Tells the emulator one kernel's resources, for its occupancy and L2 model.
    pub fn set_resources(&self, kernel: &str, res: &Resources) -> Result<()> {
        let name = CString::new(kernel).map_err(|_| {
            Error::shape(
                "Emulator::set_resources",
                "kernel",
                "a name without NUL bytes",
                format!("{kernel:?}"),
            )
        })?;
        // SAFETY: `name` is NUL-terminated and outlives the call, which copies it.
        let rc =
            unsafe { (self.set_resources)(name.as_ptr(), res.regs, res.static_smem, res.stack) };
        refused(
            "Emulator::set_resources",
            "kernel",
            "0 from moe_emu_set_resources",
            rc,
        )
    }

    /// Registers the sm_90 (or sm_90a) resources of every kernel of the crate's ptxas report;
    /// returns how many.
    pub fn register_resources(&self) -> Result<usize> {
        const OP: &str = "Emulator::register_resources";
        if !crate::kernels::built() {
            return Err(Error::KernelsNotBuilt {
                op: OP,
                module: "all",
            });
        }
        let all = ptxas::all_resources()?;
        if all.is_empty() {
            return Err(Error::Unsupported {
                op: OP,
                what: format!(
                    "no sm_90 or sm_90a kernel in the ptxas report (built for {})",
                    crate::kernels::ARCHS.join(", ")
                ),
            });
        }
        for (kernel, res) in all {
            self.set_resources(kernel, res)?;
        }
        Ok(all.len())
    }
}

fn refused(op: &'static str, arg: &'static str, expected: &str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::shape(op, arg, expected, format!("{rc}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_never_panics_and_checks_fractions_first() {
        // Without scripts/emulate (or before any Device) this is None; under it, Some.
        if let Some(emu) = Emulator::find() {
            for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
                let e = emu.set_sample(bad).unwrap_err().to_string();
                assert!(
                    e.contains("Emulator::set_sample") && e.contains("(0, 1]"),
                    "{e}"
                );
            }
            emu.set_sample(1.0).unwrap();
            let e = emu
                .set_resources("a\0b", &Resources::default())
                .unwrap_err();
            assert!(e.to_string().contains("without NUL"), "{e}");
        }
    }

    #[test]
    fn a_real_launch_gives_a_record_the_model_prices() {
        if !crate::device::driver_present() || !crate::kernels::built() {
            return;
        }
        let Ok(dev) = crate::Device::new(0) else {
            return;
        };
        let Some(emu) = Emulator::find() else {
            // A real driver: no emulator counters.
            assert!(!dev.info().emulated);
            return;
        };
        let n = emu.register_resources().unwrap();
        assert!(n > 0);
        emu.enable(true).unwrap();
        let _ = emu.take().unwrap();
        let mut t = dev.zeros::<f32>(&[1 << 16]).unwrap();
        dev.fill_uniform(&mut t, 7, -1.0, 1.0).unwrap();
        dev.synchronize().unwrap();
        let recs = emu.take().unwrap();
        emu.enable(false).unwrap();
        let fill = recs
            .iter()
            .find(|r| r.kernel.starts_with("fill_uniform"))
            .expect("a record of the fill kernel");
        let res = fill.resources.as_ref().expect("registered resources");
        assert_eq!(res.regs, ptxas::resources(&fill.kernel).unwrap().regs);
        // 65536 f32 written once: 256 KB, all of it DRAM writes in the L2 model.
        assert_eq!(fill.dram.unique_write_bytes, 262144.0);
        assert_eq!(fill.global.st.bytes, 262144.0);
        let m = super::super::model(fill, &super::super::H200).unwrap();
        assert!(m.us > 0.0);
        // The emulator's occupancy is the crate's.
        assert_eq!(res.blocks_per_sm, m.occupancy.blocks_per_sm);
        assert_eq!(res.limiter, m.occupancy.limiter.name());
    }
}
