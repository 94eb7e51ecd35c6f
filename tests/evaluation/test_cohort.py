import pytest
from scipy import stats

from evaluation.cohort import categorical_test, cohort_table, continuous_test
from evaluation.followup import followup_analysis, new_events
from evaluation.inputs import load_inputs
from evaluation.patient import group_labels, patient_counts
from tests.evaluation.synth import make_tables


def test_fisher_when_expected_below_5():
    t = [[26, 6], [1, 20]]  # expected counts all >= 5? min = 27*21/53 = 10.7 -> chi-square
    r = categorical_test(t)
    assert r["test"].startswith("chi-square, Yates")
    assert r["p_value"] == pytest.approx(stats.chi2_contingency(t, correction=True).pvalue)
    small = [[8, 2], [1, 5]]
    r = categorical_test(small)
    assert r["test"].startswith("Fisher's exact")
    assert r["p_value"] == pytest.approx(stats.fisher_exact(small).pvalue)


def test_chi_square_rxc_and_fisher_rxc():
    t = [[20, 15, 25], [30, 10, 12]]
    r = categorical_test(t)
    assert r["test"].startswith("chi-square (")
    assert r["p_value"] == pytest.approx(stats.chi2_contingency(t).pvalue)
    r2 = categorical_test([[3, 1, 2], [1, 3, 4]])
    assert r2["test"].startswith("Fisher-Freeman-Halton")
    assert 0 < r2["p_value"] <= 1


def test_wilcoxon_rank_sum_matches_scipy(rng):
    a, b = rng.normal(0, 1, 40), rng.normal(0.5, 1, 35)
    r = continuous_test([a, b])
    assert r["p_value"] == pytest.approx(
        stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    # the same test as scipy's ranksums (normal approximation, no continuity correction)
    assert r["p_value"] == pytest.approx(stats.ranksums(a, b).pvalue, abs=0.005)
    r3 = continuous_test([a, b, a + 1])
    assert r3["test"] == "Kruskal-Wallis"


def test_cohort_table_counts(rng):
    part, les, _ = make_tables(rng)
    data = load_inputs(part, les, [])
    co = cohort_table(data.participants, data.lesions, group_column="diagnosis",
                      rim_columns=["consensus"])
    row = next(r for r in co["rows"] if r["characteristic"] == "patients with ≥1 PRL (consensus)")
    per = les.groupby("participant_id")["consensus"].sum()
    for g in ("MS", "NMOSD"):
        ids = part.loc[part.diagnosis == g, "participant_id"]
        expect = int((per.reindex(ids).fillna(0) >= 1).sum())
        assert row["groups"][g]["count"] == expect
        assert row["groups"][g]["n"] == len(ids)
    sex = next(r for r in co["rows"] if r["characteristic"] == "sex")
    assert sex["kind"] == "categorical" and set(sex["levels"]) <= {"F", "M"}
    lrow = next(r for r in co["rows"] if r["characteristic"] == "lesions with PRL (consensus)")
    assert lrow["overall"]["count"] == int(les["consensus"].sum())
    enh = co["rim_enhancement"]["consensus"]["overall"]
    assert enh["n"] == len(les) and sum(map(sum, enh["table"])) == len(les)


def test_patient_counts_keep_lesion_free_participants(rng):
    part, les, _ = make_tables(rng)
    les = les[les.participant_id != "sub-001"]
    c = patient_counts(part, les, {"consensus": "consensus"})
    assert c.loc["sub-001", "n_lesions"] == 0 and c.loc["sub-001", "consensus"] == 0
    assert len(c) == len(part)


def test_followup_new_lesions_and_rims(rng):
    part, les, _ = make_tables(rng, followup=True)
    data = load_inputs(part, les, [])
    ev = new_events(data.lesions, ["truth_prl"])
    # by construction: ses-02 repeats ses-01 lesions and adds new ones with new ids
    for pid, g in data.lesions.groupby("participant_id"):
        n1 = (g.session_id == "ses-01").sum()
        n2 = (g.session_id == "ses-02").sum()
        row = ev[ev.participant_id == pid]
        assert int(row["n_new_lesions"].iloc[0]) == n2 - n1
        new = g[(g.session_id == "ses-02") & (g.lesion_id > n1)]
        assert int(row["new_rims_truth_prl"].iloc[0]) == int(new["truth_prl"].sum())
    labels = group_labels(data.participants, group_column="diagnosis", positive_group="MS")
    fu = followup_analysis(data.participants, data.lesions, group_column="diagnosis",
                           labels=labels, rim_columns=["truth_prl"])
    # sessions are known from the lesion table: lesion-free participants have none
    assert fu["n_patients_with_followup"] == data.lesions.participant_id.nunique()
    assert "sensitivity" in fu["new_rim_rule"]["truth_prl"]


def test_followup_single_session_not_estimable(rng):
    part, les, _ = make_tables(rng)
    fu = followup_analysis(part, les, group_column="diagnosis", labels=None,
                           rim_columns=["consensus"])
    assert fu["estimate"] is None and "two or more sessions" in fu["not_estimable"]
