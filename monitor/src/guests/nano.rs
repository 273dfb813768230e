//! `nano`: nanobenchmarks of the operations a VMM makes expensive, in TSC
//! cycles per iteration (RDTSC before and after a loop of `iterations`,
//! after a warm-up run of about 1/16 of that). One line per row:
//! `NANO <row> <cycles> cycles`, then isa-debug-exit with 0.
//!
//! | row | what one iteration does | mode |
//! | --- | --- | --- |
//! | `syscall` | `int BYTE 0x80` to a handler that is just `iretd` | user |
//! | `in` | `in al, dx` from the PIC mask register 0x21 | kernel |
//! | `call_ret` | `call` of a function that is just `ret` | kernel |
//! | `pgfault` | a write to a not-present page; the #PF handler maps it and unmaps (PTE clear + INVLPG) the page touched before | user |
//! | `divzero` | `div ebx` with ebx = 0; the #DE handler skips it | user |
//! | `ptemod` | flip RW in a kernel PTE + INVLPG of its page | kernel |
//! | `cr3` | `mov cr3, eax` with the same page directory | kernel |
//! | `cli_sti` | `cli ; sti` | kernel |
//! | `popf` | `popfd` setting IF, then `popfd` clearing it (two POPFs) | kernel |
//! | `compute` | `imul, add, xor, rol`: a fixed integer loop | kernel |
//!
//! Every row includes its loop overhead (`dec ecx ; jnz`). The iteration
//! count is a dword at [`ITERATIONS_ADDR`] in the image: a monitor can patch
//! it before starting the guest.

use dynasmrt::{DynasmApi, DynasmLabelApi};

use super::kernel::*;
use super::Guest;

pub const DESCRIPTION: &str = "nanobenchmarks in TSC cycles: syscall, in, call_ret, pgfault, divzero, ptemod, cr3, \
                                cli_sti, popf, compute";

/// Iterations per row of `guests::by_name("nano")`.
pub const DEFAULT_ITERATIONS: u32 = 100_000;

const fn var(n: u32) -> i32 {
    (VARS + 4 * n) as i32
}
const SAVED_ESP: i32 = var(0);
/// Guest-physical address of the iteration count (a dword in the image).
pub const ITERATIONS_ADDR: u32 = VARS + 4;
const ITERS: i32 = ITERATIONS_ADDR as i32;

/// The rows in output order.
pub const ROWS: [&str; 10] =
    ["syscall", "in", "call_ret", "pgfault", "divzero", "ptemod", "cr3", "cli_sti", "popf", "compute"];

const VEC_EXIT_USER: u8 = 0x81;
/// The two pages `pgfault` alternates between, and their frames.
const FAULT_VA: [u32; 2] = [HEAP_VA, HEAP_VA + 0x1000];
const FAULT_FRAME: [u32; 2] = [FRAME_POOL, FRAME_POOL + 0x1000];
/// The kernel page `ptemod` flips: the last of the identity map.
const PTEMOD_VA: u32 = 0x003F_F000;

/// The `nano` guest with `iterations` per row (at least 1).
pub fn guest(iterations: u32) -> Guest {
    let (image, entry) = build(iterations.max(1));
    Guest { name: "nano", image, load_addr: LOAD_ADDR, entry, description: DESCRIPTION }
}

/// Where a row's loop runs.
enum Mode {
    Kernel,
    User,
}

fn pte_addr(pt: u32, va: u32) -> i32 {
    (pt + ((va >> 12) & 0x3FF) * 4) as i32
}

fn build(iterations: u32) -> (Vec<u8>, u32) {
    let mut img = Image::new();
    img.tables();
    img.put_u32(ITERATIONS_ADDR, iterations);
    let mut ks = Strings::new(KSTRINGS, KSTRINGS_END);
    let (user_entries, ucode) = user_code();
    img.put(UCODE, &ucode);

    let mut k = Asm::new(KCODE);
    let entry = k.here();
    boot(&mut k);
    let skip = k.label();
    x86!(k; jmp =>skip);
    let r = routines(&mut k);
    let (puts, dec, exit) = (r.puts, r.print_dec, r.exit);

    // ---- handlers --------------------------------------------------------
    let panic = k.label();
    for v in 0u8..32 {
        let h = k.here();
        img.gate(v, h, 0);
        let vi = i32::from(v);
        x86!(k; push vi ; jmp =>panic);
    }
    k.bind(panic);
    print(&mut k, &r, ks.add("nano: unexpected exception "));
    x86!(k; pop eax ; call =>dec);
    print(&mut k, &r, ks.add("\n"));
    x86!(k; mov al, 1 ; jmp =>exit);

    let null = k.here();
    img.gate(VEC_SYSCALL, null, 3);
    k.iretd();

    let exit_user = k.here();
    img.gate(VEC_EXIT_USER, exit_user, 3);
    x86!(k; mov esp, [SAVED_ESP] ; ret);

    let de = k.here();
    img.gate(VEC_DE, de, 0);
    x86!(k; add DWORD [esp], 2);
    k.iretd();

    let pf = k.here();
    img.gate(VEC_PF, pf, 0);
    let (map1, done, bad) = (k.label(), k.label(), k.label());
    let pte = |i: usize| pte_addr(PT_USER0, FAULT_VA[i]);
    let (pte0, pte1) = (pte(0), pte(1));
    let (va0, va1) = (FAULT_VA[0] as i32, FAULT_VA[1] as i32);
    let (f0, f1) = ((FAULT_FRAME[0] | P | RW | US) as i32, (FAULT_FRAME[1] | P | RW | US) as i32);
    x86!(k; push eax);
    k.mov_eax_cr(2);
    x86!(k;
        cmp eax, va1
        ; je =>map1
        ; cmp eax, va0
        ; jne =>bad
        ; mov DWORD [pte0], f0
        ; mov DWORD [pte1], 0
        ; mov eax, va1
    );
    k.invlpg_eax();
    x86!(k;
        jmp =>done
        ; =>map1
        ; mov DWORD [pte1], f1
        ; mov DWORD [pte0], 0
        ; mov eax, va0
    );
    k.invlpg_eax();
    x86!(k; =>done ; pop eax ; add esp, 4);
    k.iretd();
    let pf_vec = i32::from(VEC_PF);
    x86!(k; =>bad ; pop eax ; push pf_vec ; jmp =>panic);

    // enter_user: ebx = user EIP, ecx = iterations; returns on int BYTE 0x81.
    let enter_user = k.label();
    let (uds, ucs, utop) = (i32::from(USER_DS), i32::from(USER_CS), USER_STACK_TOP as i32);
    x86!(k;
        =>enter_user
        ; mov [SAVED_ESP], esp
        ; push uds
        ; push utop
        ; push 2
        ; push ucs
        ; push ebx
    );
    k.iretd();

    // ---- kernel-mode loops: ecx iterations, TSC at SHARED and SHARED+8 ----
    let kernel_bench = |k: &mut Asm, body: &dyn Fn(&mut Asm)| {
        let (l, loop_) = (k.label(), k.label());
        k.bind(l);
        let (t0, t0h, t1, t1h) = (SHARED as i32, SHARED as i32 + 4, SHARED as i32 + 8, SHARED as i32 + 12);
        k.rdtsc();
        x86!(k; mov [t0], eax ; mov [t0h], edx ; =>loop_);
        body(k);
        x86!(k; dec ecx ; jnz =>loop_);
        k.rdtsc();
        x86!(k; mov [t1], eax ; mov [t1h], edx ; ret);
        l
    };
    let ret_fn = k.label();
    x86!(k; =>ret_fn ; ret);
    let pic_mask = i32::from(crate::layout::PORT_PIC_MASTER + 1);
    let b_in = kernel_bench(&mut k, &|k| x86!(k; mov edx, pic_mask ; in al, dx));
    let b_call = kernel_bench(&mut k, &|k| x86!(k; call =>ret_fn));
    let pte_k = pte_addr(PT_KERNEL, PTEMOD_VA);
    let b_pte = kernel_bench(&mut k, &|k| {
        let va = PTEMOD_VA as i32;
        x86!(k; xor DWORD [pte_k], 2 ; mov eax, va);
        k.invlpg_eax();
    });
    let b_cr3 = kernel_bench(&mut k, &|k| {
        k.mov_eax_cr(3);
        k.mov_cr_eax(3);
    });
    let b_cli = kernel_bench(&mut k, &|k| x86!(k; cli ; sti));
    let b_popf = kernel_bench(&mut k, &|k| {
        x86!(k; push ebx);
        k.raw(&[0x9D]);
        x86!(k; push esi);
        k.raw(&[0x9D])
    });
    let b_compute =
        kernel_bench(&mut k, &|k| x86!(k; imul eax, eax, 0x41C6_4E6D ; add eax, 12345 ; xor edi, eax ; rol edi, 5));

    // ---- main ----------------------------------------------------------------
    k.bind(skip);
    identity_table(&mut k);
    let (pd, kpt, upt) = (PD0 as i32, (PT_KERNEL | P | RW) as i32, (PT_USER0 | P | RW | US) as i32);
    let pd1 = pd + 4;
    let code_pte = pte_addr(PT_USER0, USER_VA);
    let shared_pte = pte_addr(PT_USER0, SHARED_VA);
    let stack_pte = pte_addr(PT_USER0, USER_STACK_VA);
    let (code_v, shared_v, stack_v) =
        ((UCODE | P | US) as i32, (SHARED | P | RW | US) as i32, (USTACK0 | P | RW | US) as i32);
    let (esp0, ktop) = ((TSS + 4) as i32, KSTACK0_TOP as i32);
    x86!(k;
        mov DWORD [pd], kpt
        ; mov DWORD [pd1], upt
        ; mov DWORD [code_pte], code_v
        ; mov DWORD [shared_pte], shared_v
        ; mov DWORD [stack_pte], stack_v
        ; mov DWORD [esp0], ktop
    );
    init_pic(&mut k, false);
    x86!(k; mov eax, pd);
    enable_paging(&mut k);
    x86!(k; mov eax, uds);
    k.load_data_segs_ax();

    print(&mut k, &r, ks.add("nano: TSC cycles per iteration, "));
    x86!(k; mov eax, [ITERS] ; call =>dec);
    print(&mut k, &r, ks.add(" iterations per row after a warm-up\n"));

    let rows: [(&str, Mode, dynasmrt::DynamicLabel, u32); 10] = [
        ("syscall", Mode::User, b_in, user_entries[0]),
        ("in", Mode::Kernel, b_in, 0),
        ("call_ret", Mode::Kernel, b_call, 0),
        ("pgfault", Mode::User, b_in, user_entries[1]),
        ("divzero", Mode::User, b_in, user_entries[2]),
        ("ptemod", Mode::Kernel, b_pte, 0),
        ("cr3", Mode::Kernel, b_cr3, 0),
        ("cli_sti", Mode::Kernel, b_cli, 0),
        ("popf", Mode::Kernel, b_popf, 0),
        ("compute", Mode::Kernel, b_compute, 0),
    ];
    let prefix = ks.add("NANO ") as i32;
    let suffix = ks.add(" cycles\n") as i32;
    let (t0, t0h, t1, t1h) = (SHARED as i32, SHARED as i32 + 4, SHARED as i32 + 8, SHARED as i32 + 12);
    for (name, mode, bench, uentry) in rows {
        for warm in [true, false] {
            x86!(k; mov ecx, [ITERS]);
            if warm {
                x86!(k; shr ecx, 4 ; and ecx, -2 ; add ecx, 2);
            }
            match mode {
                Mode::Kernel => {
                    // popf's two flag images: IF set (ebx) and clear (esi).
                    k.raw(&[0x9C]); // pushfd
                    x86!(k; pop eax ; and eax, !0x200 ; mov esi, eax ; or eax, 0x200 ; mov ebx, eax);
                    x86!(k; call =>bench ; cli);
                }
                Mode::User => {
                    let ue = uentry as i32;
                    x86!(k; mov ebx, ue ; call =>enter_user);
                }
            }
        }
        let n = ks.add(&format!("{name} ")) as i32;
        x86!(k;
            mov esi, prefix
            ; call =>puts
            ; mov esi, n
            ; call =>puts
            ; mov eax, [t1]
            ; mov edx, [t1h]
            ; sub eax, [t0]
            ; sbb edx, [t0h]
            ; mov ecx, [ITERS]
            ; div ecx
            ; call =>dec
            ; mov esi, suffix
            ; call =>puts
        );
    }
    print(&mut k, &r, ks.add("nano: done\n"));
    x86!(k; mov al, 0 ; jmp =>exit);

    let code = k.finish();
    assert!(code.len() <= KCODE_MAX as usize, "nano kernel code is {} bytes", code.len());
    img.put(KCODE, &code);
    ks.place(&mut img, 0);
    (img.bytes, entry)
}

/// The user-mode loops (at USER_VA): syscall, pgfault, divzero. Each takes
/// ecx iterations, stores the TSC before and after at SHARED_VA and leaves
/// with `int BYTE 0x81`.
fn user_code() -> ([u32; 3], Vec<u8>) {
    let mut u = Asm::new(USER_VA);
    let (t0, t0h, t1, t1h) = (SHARED_VA as i32, SHARED_VA as i32 + 4, SHARED_VA as i32 + 8, SHARED_VA as i32 + 12);
    let bench = |u: &mut Asm, setup: &dyn Fn(&mut Asm), body: &dyn Fn(&mut Asm)| {
        let start = u.here();
        setup(u);
        let l = u.label();
        u.rdtsc();
        x86!(u; mov [t0], eax ; mov [t0h], edx ; =>l);
        body(u);
        x86!(u; dec ecx ; jnz =>l);
        u.rdtsc();
        x86!(u; mov [t1], eax ; mov [t1h], edx);
        u.int(VEC_EXIT_USER);
        start
    };
    let syscall = bench(&mut u, &|_| {}, &|u| u.int(VEC_SYSCALL));
    let va0 = FAULT_VA[0] as i32;
    let pgfault = bench(&mut u, &|u| x86!(u; mov esi, va0), &|u| x86!(u; mov [esi], eax ; xor esi, 0x1000));
    let divzero = bench(&mut u, &|u| x86!(u; xor ebx, ebx), &|u| x86!(u; mov eax, 1 ; xor edx, edx ; div ebx));
    let code = u.finish();
    assert!(code.len() <= 0x1000, "nano user code is {} bytes", code.len());
    ([syscall, pgfault, divzero], code)
}
