//! Emulated devices of the Mirrorball VMM.
