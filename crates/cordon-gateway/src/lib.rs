//! cordon-gateway
