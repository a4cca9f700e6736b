//! Each message family's `type` names, written once per variant.

/// The `type` of each variant, written once: `kind()` (an exhaustive
/// match, so a new variant without a name does not compile) and the list
/// a decoder names in its errors both come from it.
macro_rules! kinds {
    ($family:ident { $($variant:ident => $name:literal,)* }) => {
        impl $family {
            /// Every `type` of this family.
            pub const TYPES: &'static [&'static str] = &[$($name),*];

            /// The `type` on the wire.
            pub fn kind(&self) -> &'static str {
                match self {
                    $($family::$variant { .. } => $name,)*
                }
            }
        }
    };
}
pub(super) use kinds;
