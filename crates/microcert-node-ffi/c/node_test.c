/*
 * A firmware's use of the node through the C static library, checked
 * against the known answers in vectors.h (made and verified by the Rust
 * test tests/c_vectors.rs: the ENROLL opens under Ktr, the AUTH's tag
 * verifies, the update ENROLL opens under Kupd).
 *
 * Personalize; ENROLL (1009 bytes, the expected bytes); the center's
 * RECEIPT; AUTH (31 bytes, the expected bytes, so its tag verifies); open
 * a COMMAND (UPDATE_SEED, the reply is the expected update ENROLL); and
 * the refusals: a forged COMMAND, a replayed one, a corrupted image, NULL
 * pointers, a short buffer. Exits 0 only when every check passes.
 *
 * Built and run by .ci/node-c-check.sh.
 */
#include <stdio.h>
#include <string.h>

#include "microcert_node.h"
#include "vectors.h"

static int failures = 0;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* The same LCG as the Rust test: one byte per step, the state's top byte. */
static int32_t lcg_fill(void *ctx, uint8_t *buf, size_t len) {
    uint32_t *state = (uint32_t *)ctx;
    for (size_t i = 0; i < len; i++) {
        *state = *state * 1664525u + 1013904223u;
        buf[i] = (uint8_t)(*state >> 24);
    }
    return 0;
}

static int32_t broken_fill(void *ctx, uint8_t *buf, size_t len) {
    (void)ctx;
    (void)buf;
    (void)len;
    return -1;
}

int main(void) {
    static uint8_t image[MC_NODE_IMAGE_LEN];
    static uint8_t saved[MC_NODE_IMAGE_LEN];
    static uint8_t out[MC_ENROLL_MAX_LEN];
    size_t out_len = 0;
    uint32_t state = V_RNG_SEED;
    McRng rng = {lcg_fill, &state};
    McNodeStatus st;

    /* create and personalize */
    CHECK(mc_node_blank(image) == MC_ERROR_OK);
    McPersonalization p;
    memset(&p, 0, sizeof p);
    memcpy(p.device, V_DEVICE, sizeof p.device);
    p.epoch = 0;
    p.suite = 1;
    p.device_class = 1;
    memcpy(p.transport_key, V_KTR, sizeof p.transport_key);
    p.issued = V_ISSUED;
    CHECK(mc_node_personalize(image, &p) == MC_ERROR_OK);
    CHECK(mc_node_status(image, &st) == MC_ERROR_OK);
    CHECK(st.life == 1 && st.has_seed == 0 && st.node_time == V_ISSUED);
    CHECK(memcmp(st.device, V_DEVICE, 8) == 0);
    /* personalizing again with the same epoch is refused */
    CHECK(mc_node_personalize(image, &p) == MC_ERROR_PERSONALIZATION);

    /* no AUTH before enrollment */
    CHECK(mc_node_auth(image, &rng, V_T_AUTH, NULL, out, sizeof out, &out_len) ==
          MC_ERROR_NOT_ENROLLED);

    /* a short buffer is refused */
    CHECK(mc_node_enroll(image, &rng, V_T_ENROLL, out, 100, &out_len) ==
          MC_ERROR_BUFFER_TOO_SMALL);
    /* start again from a freshly personalized node and the start of the
       random sequence, as the vectors do */
    CHECK(mc_node_blank(image) == MC_ERROR_OK);
    CHECK(mc_node_personalize(image, &p) == MC_ERROR_OK);
    state = V_RNG_SEED;

    /* ENROLL: expected length and bytes */
    CHECK(mc_node_enroll(image, &rng, V_T_ENROLL, out, sizeof out, &out_len) == MC_ERROR_OK);
    CHECK(out_len == sizeof V_ENROLL && out_len == 1009);
    CHECK(memcmp(out, V_ENROLL, sizeof V_ENROLL) == 0);
    /* asked again before the RECEIPT: the identical bytes */
    memset(out, 0, sizeof out);
    CHECK(mc_node_enroll(image, &rng, V_T_ENROLL + 5, out, sizeof out, &out_len) == MC_ERROR_OK);
    CHECK(out_len == sizeof V_ENROLL && memcmp(out, V_ENROLL, sizeof V_ENROLL) == 0);
    CHECK(mc_node_status(image, &st) == MC_ERROR_OK);
    CHECK(st.has_pending == 1 && st.pending_generation == 0);

    /* the center's RECEIPT: generation 0 in use */
    int32_t generation = 99;
    CHECK(mc_node_accept_receipt(image, V_RECEIPT, sizeof V_RECEIPT, &generation) == MC_ERROR_OK);
    CHECK(generation == 0);
    CHECK(mc_node_accept_receipt(image, V_RECEIPT, sizeof V_RECEIPT, &generation) ==
          MC_ERROR_NOT_PENDING);

    /* AUTH to the center: 31 bytes, the expected ones (its tag verifies) */
    CHECK(mc_node_auth(image, &rng, V_T_AUTH, NULL, out, sizeof out, &out_len) == MC_ERROR_OK);
    CHECK(out_len == MC_AUTH_CMAC64_LEN && out_len == sizeof V_AUTH);
    CHECK(memcmp(out, V_AUTH, sizeof V_AUTH) == 0);

    /* a forged COMMAND (one tag bit flipped) is refused and changes nothing */
    uint8_t forged[sizeof V_COMMAND];
    memcpy(forged, V_COMMAND, sizeof forged);
    forged[sizeof forged - 1] ^= 1;
    memcpy(saved, image, sizeof image);
    CHECK(mc_node_handle_command(image, &rng, V_T_COMMAND, forged, sizeof forged, out, sizeof out,
                                 &out_len) == MC_ERROR_VERIFICATION);
    CHECK(memcmp(saved, image, sizeof image) == 0);

    /* open the COMMAND (UPDATE_SEED): the reply is the expected update ENROLL */
    CHECK(mc_node_handle_command(image, &rng, V_T_COMMAND, V_COMMAND, sizeof V_COMMAND, out,
                                 sizeof out, &out_len) == MC_ERROR_OK);
    CHECK(out_len == sizeof V_UPDATE_ENROLL);
    CHECK(memcmp(out, V_UPDATE_ENROLL, sizeof V_UPDATE_ENROLL) == 0);
    CHECK(mc_node_status(image, &st) == MC_ERROR_OK);
    CHECK(st.highest_counter == 1 && st.has_pending == 1 && st.pending_generation == 1);

    /* the same COMMAND again is a replay */
    CHECK(mc_node_handle_command(image, &rng, V_T_COMMAND + 1, V_COMMAND, sizeof V_COMMAND, out,
                                 sizeof out, &out_len) == MC_ERROR_REPLAY);

    /* retransmission gives the pending update ENROLL again */
    CHECK(mc_node_retransmit(image, out, sizeof out, &out_len) == MC_ERROR_OK);
    CHECK(out_len == sizeof V_UPDATE_ENROLL &&
          memcmp(out, V_UPDATE_ENROLL, sizeof V_UPDATE_ENROLL) == 0);

    /* a failing random source: refused, no message */
    McRng broken = {broken_fill, NULL};
    CHECK(mc_node_auth(image, &broken, V_T_COMMAND + 2, NULL, out, sizeof out, &out_len) ==
          MC_ERROR_ENTROPY);
    CHECK(mc_node_auth(image, NULL, V_T_COMMAND + 2, NULL, out, sizeof out, &out_len) ==
          MC_ERROR_ENTROPY);

    /* a corrupted image is refused and left as it was */
    memcpy(saved, image, sizeof image);
    saved[200] ^= 0x40;
    CHECK(mc_node_auth(saved, &rng, V_T_COMMAND + 3, NULL, out, sizeof out, &out_len) ==
          MC_ERROR_IMAGE);
    CHECK(mc_node_status(saved, &st) == MC_ERROR_IMAGE);

    /* overlapping buffers are refused, the image untouched */
    memcpy(saved, image, sizeof image);
    CHECK(mc_node_auth(image, &rng, V_T_COMMAND + 4, NULL, image + 100, 64, &out_len) ==
          MC_ERROR_OVERLAP);
    CHECK(mc_node_handle_command(image, &rng, V_T_COMMAND + 4, V_COMMAND, sizeof V_COMMAND,
                                 image, sizeof image, &out_len) == MC_ERROR_OVERLAP);
    CHECK(memcmp(saved, image, sizeof image) == 0);

    /* NULL pointers */
    CHECK(mc_node_blank(NULL) == MC_ERROR_NULL);
    CHECK(mc_node_personalize(image, NULL) == MC_ERROR_NULL);
    CHECK(mc_node_enroll(image, &rng, 0, NULL, 10, &out_len) == MC_ERROR_NULL);
    CHECK(mc_node_handle_command(image, &rng, 0, NULL, 5, out, sizeof out, &out_len) ==
          MC_ERROR_NULL);

    if (failures != 0) {
        fprintf(stderr, "node_test: %d check(s) failed\n", failures);
        return 1;
    }
    printf("node_test: all checks passed (ENROLL %zu bytes, AUTH %u bytes)\n", sizeof V_ENROLL,
           (unsigned)sizeof V_AUTH);
    return 0;
}
