//! What the built-in guests share: the image layout, a small assembler
//! wrapper over dynasmrt (`.arch x86`), the descriptor tables, and the
//! kernel routines every guest links in (UART output, numbers, exit).
//!
//! System instructions (LGDT, far JMP, segment loads, MOV CRn, INVLPG,
//! IRETD, RDTSC...) are written as raw bytes through [`Asm::raw`] with their
//! assembly in a comment: dynasm's x86 mode mis-encodes some of them, and a
//! byte is what the manual documents anyway.

use dynasmrt::x86::X86Relocation;
use dynasmrt::{DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};

use crate::cpu::descriptor::Descriptor;
use crate::layout::{PORT_COM1, PORT_DEBUG_EXIT, PORT_PIC_MASTER, PORT_PIC_SLAVE, PORT_PIT};

/// dynasm in 32-bit mode on an [`Asm`].
macro_rules! x86 {
    ($a:expr; $($t:tt)*) => {
        dynasmrt::dynasm!($a.a ; .arch x86 ; $($t)*)
    };
}
#[allow(unused_imports)]
pub(crate) use x86;

// ---- the image ----------------------------------------------------------------

/// Guest-physical address the images load at.
pub const LOAD_ADDR: u32 = 0x0010_0000;
/// Kernel code (entry at its first byte).
pub const KCODE: u32 = LOAD_ADDR;
pub const KCODE_MAX: u32 = 0x3000;
/// User code, one page, mapped at [`USER_VA`] (user, read-only).
pub const UCODE: u32 = LOAD_ADDR + 0x3000;
/// Descriptor tables, variables, kernel strings.
pub const DATA: u32 = LOAD_ADDR + 0x4000;
pub const GDT: u32 = DATA;
pub const TSS: u32 = DATA + 0x40;
pub const GDTR: u32 = DATA + 0xB0;
pub const IDTR: u32 = DATA + 0xB8;
/// Guest variables (dwords), `VARS + 4 * n`.
pub const VARS: u32 = DATA + 0x100;
/// Kernel strings.
pub const KSTRINGS: u32 = DATA + 0x400;
pub const KSTRINGS_END: u32 = DATA + 0x1000;
/// The IDT (256 gates).
pub const IDT: u32 = LOAD_ADDR + 0x5000;
/// End of the loaded bytes.
pub const IMAGE_END: u32 = LOAD_ADDR + 0x6000;

/// Zeroed by the guest at boot (and declared as bss in the exported ELF).
pub const RUNTIME: u32 = LOAD_ADDR + 0x8000;
/// End of all the memory the guests touch.
pub const RUNTIME_END: u32 = LOAD_ADDR + 0x4_0000;
/// Stacks: per-task kernel stacks below these tops, boot stack.
pub const KSTACK0_TOP: u32 = LOAD_ADDR + 0x9000;
pub const KSTACK1_TOP: u32 = LOAD_ADDR + 0xA000;
pub const BOOT_STACK_TOP: u32 = LOAD_ADDR + 0xB000;
/// Page tables: two page directories, the kernel's identity table for
/// [0, 4 MiB), and two user tables for [4 MiB, 8 MiB).
pub const PD0: u32 = LOAD_ADDR + 0x1_0000;
pub const PD1: u32 = LOAD_ADDR + 0x1_1000;
pub const PT_KERNEL: u32 = LOAD_ADDR + 0x1_2000;
pub const PT_USER0: u32 = LOAD_ADDR + 0x1_3000;
pub const PT_USER1: u32 = LOAD_ADDR + 0x1_4000;
/// A page the kernel writes and user code reads (tick count, results).
pub const SHARED: u32 = LOAD_ADDR + 0x1_5000;
/// User stack frames.
pub const USTACK0: u32 = LOAD_ADDR + 0x1_6000;
pub const USTACK1: u32 = LOAD_ADDR + 0x1_7000;
/// Frames handed out by page-fault handlers.
pub const FRAME_POOL: u32 = LOAD_ADDR + 0x2_0000;
pub const FRAME_POOL_END: u32 = RUNTIME_END;

/// User virtual layout (page-directory entry 1, [4 MiB, 8 MiB)).
pub const USER_VA: u32 = 0x0040_0000;
pub const USER_STRINGS_VA: u32 = USER_VA + 0x800;
pub const HEAP_VA: u32 = 0x0050_0000;
pub const HEAP_END_VA: u32 = 0x0060_0000;
pub const SHARED_VA: u32 = 0x0060_0000;
pub const USER_STACK_VA: u32 = 0x007F_F000;
pub const USER_STACK_TOP: u32 = 0x0080_0000;

/// Selectors of the GDT every guest uses.
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS: u16 = 0x1B;
pub const USER_DS: u16 = 0x23;
pub const TSS_SEL: u16 = 0x28;

/// PTE/PDE bits.
pub const P: u32 = 1;
pub const RW: u32 = 2;
pub const US: u32 = 4;

/// Interrupt vectors.
pub const VEC_DE: u8 = 0;
pub const VEC_PF: u8 = 14;
pub const VEC_TIMER: u8 = 0x20;
pub const VEC_SYSCALL: u8 = 0x80;

/// A guest image being built: the bytes [LOAD_ADDR, IMAGE_END).
pub struct Image {
    pub bytes: Vec<u8>,
}

impl Image {
    pub fn new() -> Image {
        Image { bytes: vec![0; (IMAGE_END - LOAD_ADDR) as usize] }
    }

    pub fn put(&mut self, addr: u32, data: &[u8]) {
        let off = (addr - LOAD_ADDR) as usize;
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }

    pub fn put_u32(&mut self, addr: u32, v: u32) {
        self.put(addr, &v.to_le_bytes());
    }

    /// The GDT (null, kernel code/data, user code/data, TSS), the TSS
    /// (SS0 = kernel data, no I/O bitmap) and the GDTR/IDTR images.
    pub fn tables(&mut self) {
        let flat = |typ: u8, dpl: u8| {
            Descriptor { base: 0, limit: u32::MAX, typ, s: true, dpl, present: true, db: true, g: true, avl: false }
                .to_u64()
        };
        let tss = Descriptor {
            base: TSS,
            limit: 0x67,
            typ: 0x9,
            s: false,
            dpl: 0,
            present: true,
            db: false,
            g: false,
            avl: false,
        }
        .to_u64();
        for (i, d) in [0, flat(0xB, 0), flat(0x3, 0), flat(0xB, 3), flat(0x3, 3), tss].iter().enumerate() {
            self.put(GDT + 8 * i as u32, &d.to_le_bytes());
        }
        self.put_u32(TSS + 8, u32::from(KERNEL_DS)); // SS0
        self.put(TSS + 102, &104u16.to_le_bytes()); // I/O map base: none
        self.put(GDTR, &(6 * 8 - 1u16).to_le_bytes());
        self.put_u32(GDTR + 2, GDT);
        self.put(IDTR, &(256 * 8 - 1u16).to_le_bytes());
        self.put_u32(IDTR + 2, IDT);
    }

    /// An interrupt gate for `vector` to `handler`, callable from CPL `dpl`.
    pub fn gate(&mut self, vector: u8, handler: u32, dpl: u8) {
        let attr = 0x8E | (dpl << 5);
        let d = u64::from(handler & 0xFFFF)
            | (u64::from(KERNEL_CS) << 16)
            | (u64::from(attr) << 40)
            | (u64::from(handler >> 16) << 48);
        self.put(IDT + 8 * u32::from(vector), &d.to_le_bytes());
    }
}

/// NUL-terminated strings placed at consecutive guest addresses.
pub struct Strings {
    next: u32,
    end: u32,
    items: Vec<(u32, Vec<u8>)>,
}

impl Strings {
    pub fn new(start: u32, end: u32) -> Strings {
        Strings { next: start, end, items: Vec::new() }
    }

    /// The guest address of `s` (NUL-terminated).
    pub fn add(&mut self, s: &str) -> u32 {
        let addr = self.next;
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.next += b.len() as u32;
        assert!(self.next <= self.end, "guest string table overflow");
        self.items.push((addr, b));
        addr
    }

    /// Copies the strings into `image` (which holds them at their addresses
    /// minus `delta`: user strings live at a virtual address).
    pub fn place(&self, image: &mut Image, delta: u32) {
        for (a, b) in &self.items {
            image.put(a - delta, b);
        }
    }
}

/// A dynasm assembler at a fixed guest address.
pub struct Asm {
    pub a: VecAssembler<X86Relocation>,
    base: u32,
}

impl Asm {
    pub fn new(base: u32) -> Asm {
        Asm { a: VecAssembler::new(base as usize), base }
    }

    /// The guest address of the next byte.
    pub fn here(&self) -> u32 {
        self.base + self.a.offset().0 as u32
    }

    pub fn label(&mut self) -> DynamicLabel {
        self.a.new_dynamic_label()
    }

    pub fn bind(&mut self, l: DynamicLabel) {
        x86!(self; =>l);
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.a.extend(bytes);
    }

    /// `iretd`
    pub fn iretd(&mut self) {
        self.raw(&[0xCF]);
    }

    /// `mov crN, eax` (0F 22 /r).
    pub fn mov_cr_eax(&mut self, cr: u8) {
        self.raw(&[0x0F, 0x22, 0xC0 | (cr << 3)]);
    }

    /// `mov eax, crN` (0F 20 /r).
    pub fn mov_eax_cr(&mut self, cr: u8) {
        self.raw(&[0x0F, 0x20, 0xC0 | (cr << 3)]);
    }

    /// `invlpg [eax]`
    pub fn invlpg_eax(&mut self) {
        self.raw(&[0x0F, 0x01, 0x38]);
    }

    /// `int n`
    pub fn int(&mut self, n: u8) {
        self.raw(&[0xCD, n]);
    }

    /// `rdtsc`
    pub fn rdtsc(&mut self) {
        self.raw(&[0x0F, 0x31]);
    }

    /// `mov ds, ax ; mov es, ax ; mov fs, ax ; mov gs, ax`
    pub fn load_data_segs_ax(&mut self) {
        self.raw(&[0x8E, 0xD8, 0x8E, 0xC0, 0x8E, 0xE0, 0x8E, 0xE8]);
    }

    /// `out port, al` for a constant port (through DX).
    pub fn outb(&mut self, port: u16, value: u8) {
        let p = i32::from(port);
        let v = value as i8;
        x86!(self; mov edx, p ; mov al, BYTE v ; out dx, al);
    }

    pub fn finish(self) -> Vec<u8> {
        self.a.finalize().expect("guest code assembles: all labels are bound")
    }
}

/// Entry points of the shared kernel routines.
pub struct Routines {
    /// `al` → COM1 (polls LSR.THRE). Preserves all registers.
    pub putc: DynamicLabel,
    /// `esi` → NUL-terminated string to COM1. Preserves all registers.
    pub puts: DynamicLabel,
    /// `eax` in decimal. Preserves all registers.
    pub print_dec: DynamicLabel,
    /// `eax` as `0x%08x`. Preserves all registers.
    pub print_hex: DynamicLabel,
    /// isa-debug-exit with `al`, then halt forever.
    pub exit: DynamicLabel,
}

/// Emits the boot prologue at the current address (the image entry): own
/// GDT, flat kernel segments, boot stack, IDT, TSS. Multiboot EAX/EBX are
/// ignored.
pub fn boot(k: &mut Asm) {
    let gdtr = GDTR as i32;
    let idtr = IDTR as i32;
    // cli ; lgdt [GDTR]
    k.raw(&[0xFA, 0x0F, 0x01, 0x15]);
    k.raw(&gdtr.to_le_bytes());
    // jmp far KERNEL_CS:next
    let next = k.here() + 7;
    k.raw(&[0xEA]);
    k.raw(&next.to_le_bytes());
    k.raw(&KERNEL_CS.to_le_bytes());
    let kds = i32::from(KERNEL_DS);
    x86!(k; mov eax, kds);
    k.load_data_segs_ax();
    k.raw(&[0x8E, 0xD0]); // mov ss, ax
    let top = BOOT_STACK_TOP as i32;
    x86!(k; mov esp, top);
    // lidt [IDTR]
    k.raw(&[0x0F, 0x01, 0x1D]);
    k.raw(&idtr.to_le_bytes());
    let tss = i32::from(TSS_SEL);
    x86!(k; mov eax, tss);
    k.raw(&[0x0F, 0x00, 0xD8]); // ltr ax
                                // Zero the runtime area (tables, stacks, frames).
    let start = RUNTIME as i32;
    let dwords = ((RUNTIME_END - RUNTIME) / 4) as i32;
    x86!(k; cld ; mov edi, start ; mov ecx, dwords ; xor eax, eax ; rep stosd);
}

/// Masks every PIC line (`mask = 0xFF`) or programs both PICs (ICW1-4,
/// vectors 0x20/0x28) with IRQ0 the only unmasked line.
pub fn init_pic(k: &mut Asm, irq0_only: bool) {
    let (m, s) = (PORT_PIC_MASTER, PORT_PIC_SLAVE);
    for (port, v) in [(m, 0x11), (s, 0x11), (m + 1, VEC_TIMER), (s + 1, VEC_TIMER + 8), (m + 1, 4), (s + 1, 2)] {
        k.outb(port, v);
    }
    k.outb(m + 1, 0x01);
    k.outb(s + 1, 0x01);
    k.outb(m + 1, if irq0_only { 0xFE } else { 0xFF });
    k.outb(s + 1, 0xFF);
}

/// PIT channel 0, mode 2 (rate generator) at `hz`.
pub fn init_pit(k: &mut Asm, hz: u32) {
    let divisor = (crate::layout::PIT_FREQUENCY_HZ as u32 / hz).min(0xFFFF) as u16;
    k.outb(PORT_PIT + 3, 0x34);
    k.outb(PORT_PIT, divisor as u8);
    k.outb(PORT_PIT, (divisor >> 8) as u8);
}

/// Turns paging on with `eax` = page directory (CR0.PG | CR0.WP).
pub fn enable_paging(k: &mut Asm) {
    k.mov_cr_eax(3);
    k.mov_eax_cr(0);
    let bits = 0x8001_0000u32 as i32;
    x86!(k; or eax, bits);
    k.mov_cr_eax(0);
}

/// Fills the kernel page table: [0, 4 MiB) identity, supervisor, RW.
pub fn identity_table(k: &mut Asm) {
    let pt = PT_KERNEL as i32;
    let l = k.label();
    let prw = (P | RW) as i32;
    x86!(k;
        mov edi, pt
        ; mov eax, prw
        ; mov ecx, 1024
        ; =>l
        ; stosd
        ; add eax, 0x1000
        ; dec ecx
        ; jnz =>l
    );
}

/// Emits the shared routines and returns their labels.
pub fn routines(k: &mut Asm) -> Routines {
    let r = Routines { putc: k.label(), puts: k.label(), print_dec: k.label(), print_hex: k.label(), exit: k.label() };
    let (putc, puts, dec, hex, exit) = (r.putc, r.puts, r.print_dec, r.print_hex, r.exit);
    let thr = i32::from(PORT_COM1);
    let lsr = i32::from(PORT_COM1 + 5);
    let (wait, s_loop, s_done, d_div, d_out, h_loop, h_digit, halt) =
        (k.label(), k.label(), k.label(), k.label(), k.label(), k.label(), k.label(), k.label());
    let debug_exit = i32::from(PORT_DEBUG_EXIT);
    x86!(k;
        =>putc
        ; push edx
        ; push eax
        ; mov edx, lsr
        ; =>wait
        ; in al, dx
        ; test al, 0x20
        ; jz =>wait
        ; pop eax
        ; mov edx, thr
        ; out dx, al
        ; pop edx
        ; ret

        ; =>puts
        ; push esi
        ; push eax
        ; =>s_loop
        ; mov al, [esi]
        ; test al, al
        ; jz =>s_done
        ; call =>putc
        ; inc esi
        ; jmp =>s_loop
        ; =>s_done
        ; pop eax
        ; pop esi
        ; ret

        ; =>dec
        ; pushad
        ; mov ecx, 10
        ; xor ebx, ebx
        ; =>d_div
        ; xor edx, edx
        ; div ecx
        ; push edx
        ; inc ebx
        ; test eax, eax
        ; jnz =>d_div
        ; =>d_out
        ; pop eax
        ; add al, 0x30
        ; call =>putc
        ; dec ebx
        ; jnz =>d_out
        ; popad
        ; ret

        ; =>hex
        ; pushad
        ; mov edx, eax
        ; mov al, 0x30
        ; call =>putc
        ; mov al, 0x78
        ; call =>putc
        ; mov ecx, 8
        ; =>h_loop
        ; rol edx, 4
        ; mov eax, edx
        ; and eax, 0xF
        ; cmp al, 10
        ; jb =>h_digit
        ; add al, 0x27
        ; =>h_digit
        ; add al, 0x30
        ; call =>putc
        ; dec ecx
        ; jnz =>h_loop
        ; popad
        ; ret

        ; =>exit
        ; mov edx, debug_exit
        ; out dx, al
        ; =>halt
        ; cli
        ; hlt
        ; jmp =>halt
    );
    r
}

/// `mov esi, s ; call puts`
pub fn print(k: &mut Asm, r: &Routines, s: u32) {
    let puts = r.puts;
    let s = s as i32;
    x86!(k; mov esi, s ; call =>puts);
}

/// The start of a kernel that needs nothing between its boot prologue and
/// its own code: the entry address, then [`boot`], the [`routines`]
/// jumped over. Returns the entry and the routines.
pub fn kernel_start(k: &mut Asm) -> (u32, Routines) {
    let entry = k.here();
    boot(k);
    let skip = k.label();
    x86!(k; jmp =>skip);
    let r = routines(k);
    k.bind(skip);
    (entry, r)
}

/// One entry stub per vector of `vectors`: a zero error code where the CPU
/// pushes none, then the vector, then a jump to `common`; and its IDT gate,
/// DPL 3 for `user_vector` (an INT from user code) and 0 for the others.
pub fn interrupt_stubs(
    k: &mut Asm,
    img: &mut Image,
    vectors: impl IntoIterator<Item = u8>,
    common: DynamicLabel,
    user_vector: u8,
) {
    let mut stubs = Vec::new();
    for v in vectors {
        stubs.push((v, k.here()));
        if !has_error_code(v) {
            x86!(k; push 0);
        }
        let vi = i32::from(v);
        x86!(k; push vi ; jmp =>common);
    }
    for &(v, addr) in &stubs {
        img.gate(v, addr, if v == user_vector { 3 } else { 0 });
    }
}

/// The vectors whose exceptions push an error code.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}
