//! The execution host: the address window, the host LDT, entry into guest code and exits.
