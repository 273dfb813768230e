//! Guest image loaders: multiboot v1 ELF, Linux boot protocol, initramfs.
