//! Machine-readable description of the ABI: every shared structure with its C name, size and
//! fields, and every constant with its C name.
//!
//! The structures are declared through `abi_struct!`, which derives the
//! field list from the declaration itself (so it cannot go stale) and asserts at compile time that
//! the fields tile the structure exactly: no implicit padding, nothing left out. The tests compare
//! these descriptions with `guest/linux/mirrorball_abi.h`, textually and through a C compiler.

/// One field of a shared structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldDesc {
    /// Field name; the same in Rust and C.
    pub name: &'static str,
    /// Byte offset from the start of the structure.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// One shared structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StructDesc {
    /// Rust type name.
    pub rust_name: &'static str,
    /// C type, e.g. `struct mb_guest_header`.
    pub c_name: &'static str,
    /// `size_of` in bytes.
    pub size: usize,
    /// `align_of` in bytes.
    pub align: usize,
    /// Fields in declaration (= memory) order.
    pub fields: &'static [FieldDesc],
}

/// One constant shared with C (`#define NAME value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConstDesc {
    /// C macro name (`MB_...`).
    pub c_name: &'static str,
    /// Value, widened to `u64`.
    pub value: u64,
}

/// Size of the field a projection closure points at (used by `abi_struct!` in const context).
pub(crate) const fn field_size<T, F>(_projection: fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

/// True if `fields` cover `0..size` contiguously, in order, with no gap or overlap.
pub(crate) const fn fields_tile(fields: &[FieldDesc], size: usize) -> bool {
    let mut next = 0;
    let mut i = 0;
    while i < fields.len() {
        if fields[i].offset != next || fields[i].size == 0 {
            return false;
        }
        next += fields[i].size;
        i += 1;
    }
    next == size
}

pub(crate) use sealed::{Shared, Zero};

/// Crate-internal traits that appear in public bounds (public but unnameable: sealed).
pub(crate) mod sealed {
    /// Stores zero into every field of a shared structure (used when formatting a region).
    pub trait Zero {
        /// Stores zero into every field.
        fn zero(&self);
    }

    /// Marker for the structures that may be placed in shared memory: `repr(C)`, built only
    /// from atomics (so a shared reference to one is sound while another party writes it),
    /// alignment ≤ 8.
    ///
    /// # Safety
    /// Implementors must consist only of `core::sync::atomic` integers (or arrays / other
    /// `Shared` structures of them), without implicit padding, and have an alignment of at
    /// most 8.
    pub unsafe trait Shared: Zero + Sized {}
}

macro_rules! impl_zero_atomic {
    ($($t:ty),*) => {
        $(impl Zero for $t {
            fn zero(&self) {
                self.store(0, core::sync::atomic::Ordering::Relaxed);
            }
        })*
    };
}
impl_zero_atomic!(
    core::sync::atomic::AtomicU16,
    core::sync::atomic::AtomicU32,
    core::sync::atomic::AtomicU64
);

impl<T: Zero, const N: usize> Zero for [T; N] {
    fn zero(&self) {
        for item in self {
            item.zero();
        }
    }
}

// SAFETY: atomic integers are `UnsafeCell`s of plain integers, alignment ≤ 8; arrays of shared
// types add no padding.
unsafe impl Shared for core::sync::atomic::AtomicU16 {}
// SAFETY: as above.
unsafe impl Shared for core::sync::atomic::AtomicU32 {}
// SAFETY: as above.
unsafe impl Shared for core::sync::atomic::AtomicU64 {}
// SAFETY: as above.
unsafe impl<T: Shared, const N: usize> Shared for [T; N] {}

/// Declares a shared `repr(C)` structure, its [`StructDesc`], its [`Zero`] implementation and
/// the compile-time checks (fields tile the structure, alignment ≤ 8, expected size).
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident as $cname:literal, size $size:literal {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        #[repr(C)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Description of this structure (C name, size, fields).
            pub const DESC: $crate::desc::StructDesc = $crate::desc::StructDesc {
                rust_name: stringify!($name),
                c_name: $cname,
                size: core::mem::size_of::<$name>(),
                align: core::mem::align_of::<$name>(),
                fields: &[
                    $( $crate::desc::FieldDesc {
                        name: stringify!($field),
                        offset: core::mem::offset_of!($name, $field),
                        size: $crate::desc::field_size(|s: &$name| &s.$field),
                    }, )*
                ],
            };
        }

        impl $crate::desc::Zero for $name {
            fn zero(&self) {
                $( $crate::desc::Zero::zero(&self.$field); )*
            }
        }

        // SAFETY: every field type is `Shared` (checked below), the fields tile the structure (no
        // padding) and the alignment is at most 8 (both asserted below).
        unsafe impl $crate::desc::Shared for $name {}

        const _: () = {
            const fn field_is_shared<T: $crate::desc::Shared>() {}
            $( field_is_shared::<$ty>(); )*
        };

        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        const _: () = assert!(core::mem::align_of::<$name>() <= 8);
        const _: () = assert!($crate::desc::fields_tile($name::DESC.fields, $size));
    };
}

pub(crate) use abi_struct;

/// Declares public constants and the [`ConstDesc`] list that names them in C.
macro_rules! abi_consts {
    (
        $( $(#[$meta:meta])* pub const $name:ident : $ty:ty = $value:expr => $cname:literal; )*
    ) => {
        $( $(#[$meta])* pub const $name: $ty = $value; )*

        /// Every constant shared with the C header, by its C name.
        pub const CONSTANTS: &[$crate::desc::ConstDesc] = &[
            $( $crate::desc::ConstDesc { c_name: $cname, value: $name as u64 }, )*
        ];
    };
}
pub(crate) use abi_consts;
