//! The formats: their GGUF block sizes and their panel layouts.

/// Elements per 32-element block (the unit of activation quantisation for legacy formats, and
/// of the panel's value layout for every format).
pub const BLOCK: usize = 32;
/// Elements per K-quant super-block.
pub const SUPER: usize = 256;
/// Rows per panel group.
pub const GROUP: usize = 8;

/// A weight format with a quantized product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 4-bit, symmetric: `x = (q - 8) · d` per 32 elements.
    Q4_0,
    /// 4-bit with a minimum: `x = q · d + m`.
    Q4_1,
    /// 5-bit, symmetric: `x = (q - 16) · d`.
    Q5_0,
    /// 5-bit with a minimum: `x = q · d + m`.
    Q5_1,
    /// 8-bit, symmetric: `x = q · d`.
    Q8_0,
    /// 4-bit K-quant: 256-element super-blocks of eight 32-element sub-blocks, each with a
    /// 6-bit scale and minimum: `x = d · sc · q − dmin · m`.
    Q4_K,
    /// 5-bit K-quant, laid out as `Q4_K` with a 5th bit per element.
    Q5_K,
    /// 6-bit K-quant: sixteen 16-element sub-blocks with 8-bit signed scales:
    /// `x = d · sc · (q − 32)`.
    Q6_K,
    /// IEEE half precision.
    F16,
}

impl QuantType {
    /// Every supported format.
    pub const ALL: [QuantType; 9] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
        QuantType::F16,
    ];

    /// The name GGUF and llama.cpp use.
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
            QuantType::F16 => "F16",
        }
    }

    /// Elements per GGUF block (a row's length must be a multiple of it).
    pub const fn block_elems(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => SUPER,
            _ => BLOCK,
        }
    }

    /// Bytes per GGUF block of [`Self::block_elems`] elements.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
            QuantType::F16 => 64,
        }
    }

    /// Bytes a GGUF row of `cols` elements takes (`cols` a multiple of the block).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// Whether the format is a K-quant (activations quantised per 256).
    pub const fn is_k(self) -> bool {
        matches!(self, QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K)
    }

    /// The integer subtracted from every stored value (`q − offset`).
    pub(crate) const fn offset(self) -> i32 {
        match self {
            QuantType::Q4_0 => 8,
            QuantType::Q5_0 => 16,
            QuantType::Q8_0 => 128,
            QuantType::Q6_K => 32,
            _ => 0,
        }
    }

    /// Whether each block carries a minimum added to every element.
    pub(crate) const fn has_min(self) -> bool {
        matches!(
            self,
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K
        )
    }

    /// Bit planes above the low nibble (5-bit: one, 6-bit: two).
    pub(crate) const fn high_planes(self) -> usize {
        match self {
            QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5_K => 1,
            QuantType::Q6_K => 2,
            _ => 0,
        }
    }

    /// Panel bytes of one 32-element sub-block's values for a group of eight rows.
    pub(crate) const fn sub_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 256,
            QuantType::F16 => 512,
            _ => 128 + 32 * self.high_planes(),
        }
    }

    /// Elements per panel record (one GGUF block of each of eight rows).
    pub(crate) const fn rec_elems(self) -> usize {
        self.block_elems()
    }

    /// Bytes of a record's scale section (after its sub-blocks' values).
    pub(crate) const fn tail_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => 16,
            QuantType::Q4_1 | QuantType::Q5_1 => 32,
            // d, dmin, then 8 sub-blocks × 8 rows of scales and of minimums.
            QuantType::Q4_K | QuantType::Q5_K => 32 + 64 + 64,
            // d, then 16 sub-blocks × 8 rows of signed scales.
            QuantType::Q6_K => 16 + 128,
            QuantType::F16 => 0,
        }
    }

    /// Bytes of one panel record (eight rows × one GGUF block).
    pub(crate) const fn rec_bytes(self) -> usize {
        self.rec_elems() / BLOCK * self.sub_bytes() + self.tail_bytes()
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
