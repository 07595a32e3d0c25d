//! Host-side accounting for Mirrorball.
