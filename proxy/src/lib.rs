//! The Bowline proxy.
//!
//! One binary for the sidecar and the gateway: an xDS client feeding an L7
//! data path built from tower layers, and an `init` mode that installs the
//! iptables capture rules.
