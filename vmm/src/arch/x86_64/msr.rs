//! Model-specific registers set at vCPU creation.
