//! The kernel images build.rs embedded, and what they were built with.

mod images {
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

pub use images::{ARCHS, NVCC_VERSION, PTXAS_REPORT};

/// One compiled `kernels/<family>.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Activation,
    Routing,
    Permute,
    GroupedGemm,
    /// kernels/grouped_gemm_sm90a.cu: GEMM v3, sm_90a only.
    GroupedGemmSm90a,
    Fill,
    Quant,
    Decode,
    Lora,
}

impl Module {
    pub const ALL: &'static [Module] = &[
        Module::Activation,
        Module::Routing,
        Module::Permute,
        Module::GroupedGemm,
        Module::GroupedGemmSm90a,
        Module::Fill,
        Module::Quant,
        Module::Decode,
        Module::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::Activation => "activation",
            Module::Routing => "routing",
            Module::Permute => "permute",
            Module::GroupedGemm => "grouped_gemm",
            Module::GroupedGemmSm90a => "grouped_gemm_sm90a",
            Module::Fill => "fill",
            Module::Quant => "quant",
            Module::Decode => "decode",
            Module::Lora => "lora",
        }
    }

    /// The fatbin, or `None` when the crate was built without nvcc.
    pub fn image(self) -> Option<&'static [u8]> {
        match self {
            Module::Activation => images::ACTIVATION,
            Module::Routing => images::ROUTING,
            Module::Permute => images::PERMUTE,
            Module::GroupedGemm => images::GROUPED_GEMM,
            Module::GroupedGemmSm90a => images::GROUPED_GEMM_SM90A,
            Module::Fill => images::FILL,
            Module::Quant => images::QUANT,
            Module::Decode => images::DECODE,
            Module::Lora => images::LORA,
        }
    }
}

/// True when build.rs compiled every kernel file.
pub fn built() -> bool {
    Module::ALL.iter().all(|m| m.image().is_some())
}
